"""A GGUF file loaded in llama.cpp with explicit parameters: what verification and the behaviour check run on.

    with GGUFRunner(Path("models/demo/demo-q4_k_m.gguf"), n_ctx=1024, n_threads=2) as model:
        model.logits(model.tokenize("The capital of France is"))   # [n_tokens, n_vocab] float32
        model.chat([{"role": "user", "content": "Hi"}], max_tokens=16)  # ChatAnswer(text, finished, n_tokens)
    GGUFRunner(base_gguf, n_ctx=1024, lora=[(Path("models/personas/hammy-lora-f16.gguf"), 1.0)])  # base + adapter

llama-cpp-python's ``Llama`` class builds its model parameters itself, so it cannot load a model without llama.cpp's
extra CPU buffer types (AMX / repacked weight layouts). A build with AMX (GGML_NATIVE on an AMX CPU) segfaulted on
the first multi-token batch of any quantized model, the catalog's Q4_1 default included; a verification must not
die with the process, so it reads weights in the plain CPU layout (same numbers, slower). This class passes
``llama_model_params`` explicitly instead, and does what ``Llama`` did for us the way ``Llama`` does it: a chat
answer is the GGUF's own chat template rendered with jinja2 (``Jinja2ChatFormatter``), greedy decoding until an
end-of-generation token, the template's end-of-sequence text or ``max_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import numpy as np

from edgellm.convert.llamacpp import ConvertError
from edgellm.hardware import default_threads


@dataclass(frozen=True)
class ChatAnswer:
    text: str
    finished: bool  # ended with an end-of-generation token or the end-of-sequence text, not at max_tokens
    n_tokens: int  # tokens generated (the end-of-generation token not counted)


class GGUFRunner:
    """One model, one context (``n_ctx`` tokens), greedy decoding. ``extra_buffer_types`` is llama.cpp's
    ``use_extra_bufts`` (weight repacking); off by default, see the module docstring. ``lora``: GGUF LoRA adapters
    and their scales, applied at run time on this context (``llama_adapter_lora_init`` + ``llama_set_adapters_lora``;
    llama.cpp checks each against the model and frees it with the model)."""

    def __init__(
        self,
        path: Path,
        n_ctx: int,
        n_threads: int | None = None,
        extra_buffer_types: bool = False,
        lora: Sequence[tuple[Path, float]] = (),
    ) -> None:
        import llama_cpp as ll
        from llama_cpp._internals import LlamaBatch, LlamaContext, LlamaModel

        self.path = Path(path)
        if not self.path.is_file():
            raise ConvertError(f"{self.path}: no such GGUF file")
        threads = n_threads or default_threads()
        self._ll = ll
        ll.llama_backend_init()
        mparams = ll.llama_model_default_params()
        mparams.use_extra_bufts = extra_buffer_types
        self.n_batch = min(n_ctx, 512)
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.no_perf = True
        try:
            self._model = LlamaModel(path_model=str(self.path), params=mparams, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise ConvertError(f"llama.cpp cannot load {self.path.name}: {e}") from e
        try:
            self._ctx = LlamaContext(model=self._model, params=cparams, verbose=False)
        except (ValueError, RuntimeError) as e:
            self._model.close()
            raise ConvertError(f"llama.cpp cannot make a context of {n_ctx} tokens for {self.path.name}: {e}") from e
        self._batch = LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=False)
        if lora:
            self._set_adapters(lora)
        self.n_ctx = n_ctx
        self.n_vocab = self._model.n_vocab()
        self.metadata: dict[str, str] = self._model.metadata()

    def _set_adapters(self, lora: Sequence[tuple[Path, float]]) -> None:
        import ctypes

        ll = self._ll
        adapters = []
        for path, _ in lora:
            if not Path(path).is_file():
                self.close()
                raise ConvertError(f"{path}: no such LoRA adapter file")
            adapter = ll.llama_adapter_lora_init(self._model.model, str(path).encode("utf-8"))
            if not adapter:
                self.close()
                raise ConvertError(
                    f"llama.cpp cannot apply the LoRA adapter {Path(path).name} to {self.path.name}: not a LoRA GGUF, "
                    "or made for another base model (architecture or tensor shapes differ)"
                )
            adapters.append(adapter)
        arr = (ll.llama_adapter_lora_p_ctypes * len(adapters))(*adapters)
        scales = (ctypes.c_float * len(lora))(*(float(s) for _, s in lora))
        if ll.llama_set_adapters_lora(self._ctx.ctx, arr, len(adapters), scales) != 0:
            self.close()
            raise ConvertError(f"llama.cpp could not set {len(adapters)} LoRA adapter(s) on {self.path.name}")

    # -- tokens and log-probabilities ----------------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        return list(self._model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def _decode(self, tokens: list[int], n_past: int, all_logits: bool) -> np.ndarray:
        """Decode ``tokens`` after ``n_past`` cached ones; logits of every position, or of the last one."""
        rows = []
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            self._batch.set_batch(batch=chunk, n_past=n_past + start, logits_all=all_logits)
            try:
                self._ctx.decode(self._batch)
            except RuntimeError as e:
                raise ConvertError(f"{self.path.name}: {e}") from e
            n_out = len(chunk) if all_logits else 1
            out = np.ctypeslib.as_array(self._ctx.get_logits(), shape=(n_out * self.n_vocab,))
            rows.append(out.reshape(n_out, self.n_vocab).copy())
        return np.concatenate(rows) if all_logits else rows[-1]

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Raw next-token logits at every position of ``tokens`` (float32, ``[len(tokens), n_vocab]``), from an
        empty cache."""
        self._ctx.kv_cache_clear()
        return self._decode(list(tokens), 0, all_logits=True)

    # -- chat ----------------------------------------------------------------------------------------------------

    def chat(self, messages: list[dict[str, Any]], max_tokens: int) -> ChatAnswer:
        """The greedy answer to ``messages`` through the GGUF's own chat template, from an empty cache."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.metadata.get("tokenizer.chat_template")
        if not template:
            raise ConvertError(f"{self.path.name} has no chat template inside (tokenizer.chat_template)")
        bos, eos = self._model.token_bos(), self._model.token_eos()
        eos_text = self._model.token_get_text(eos) if eos != -1 else ""
        bos_text = self._model.token_get_text(bos) if bos != -1 else ""
        formatter = Jinja2ChatFormatter(template=template, eos_token=eos_text, bos_token=bos_text)
        formatted = formatter(messages=cast(Any, messages))
        prompt = self.tokenize(formatted.prompt, add_bos=not formatted.added_special, special=True)
        if len(prompt) >= self.n_ctx:
            raise ConvertError(
                f"{self.path.name}: a prompt of {len(prompt)} tokens does not fit the context of {self.n_ctx}"
            )
        max_tokens = min(max_tokens, self.n_ctx - len(prompt))
        stops = [s.encode("utf-8") for s in (formatted.stop or []) if s]
        self._ctx.kv_cache_clear()
        logits = self._decode(prompt, 0, all_logits=False)[-1]
        completion: list[int] = []
        text, finished = b"", False
        while True:
            token = int(np.argmax(logits))  # greedy: the first of equal maxima, as llama.cpp's greedy sampler
            if self._ll.llama_vocab_is_eog(self._model.vocab, token):
                text, finished = self._model.detokenize(completion), True
                break
            completion.append(token)
            text = self._model.detokenize(completion)
            if hits := [s for s in stops if s in text]:
                text, finished = text[: text.index(hits[0])], True
                break
            if len(completion) >= max_tokens:
                break
            logits = self._decode([token], len(prompt) + len(completion) - 1, all_logits=False)[-1]
        return ChatAnswer(text=text.decode("utf-8", errors="ignore"), finished=finished, n_tokens=len(completion))

    # -- lifetime ------------------------------------------------------------------------------------------------

    def close(self) -> None:
        for part in ("_batch", "_ctx", "_model"):
            if (obj := self.__dict__.pop(part, None)) is not None:
                obj.close()

    def __enter__(self) -> GGUFRunner:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

