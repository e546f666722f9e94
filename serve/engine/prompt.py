"""Chat prompts from the GGUF's own chat template (``tokenizer.chat_template``), rendered with the same sandboxed
Jinja environment llama-cpp-python and transformers use. A model without a template falls back to ChatML, as
llama.cpp does."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from edgellm.serve.engine.base import ChatMessage, InvalidPromptError

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplate:
    """Renders messages to the prompt text a model was trained on."""

    def __init__(self, template: str | None, bos_token: str, eos_token: str) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.source = template or CHATML
        self.bos_token = bos_token
        self._formatter = Jinja2ChatFormatter(
            template=self.source, eos_token=eos_token, bos_token=bos_token, add_generation_prompt=True
        )

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], bos_token: str, eos_token: str) -> ChatTemplate:
        return cls(metadata.get("tokenizer.chat_template"), bos_token, eos_token)

    def render(self, messages: Sequence[ChatMessage]) -> str:
        payload = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return self._formatter(messages=payload).prompt  # type: ignore[arg-type]
        except Exception as e:  # the template's raise_exception() or a Jinja error
            raise InvalidPromptError(f"the model's chat template rejected these messages: {e}") from None
