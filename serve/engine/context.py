"""A GGUF loaded for the batched engine: the llama model and one llama context of ``n_seq`` sequences, built with
explicit parameters (threads, batch size, KV layout, flash attention), and what a step needs from them: the
prompt tokenizer (``tokens.py``), the end-of-generation tokens, the token pieces, the chat template bound to that
tokenizer, ``decode`` and the KV operations.

Context sizing: ``ModelSpec.n_ctx`` is what one request can hold. The llama context has ``n_ctx * n_seq`` cells and
``n_seq_max = n_seq``; by default the KV cache is split per sequence (``kv_unified=False``: each sequence owns a
stream of ``n_ctx`` cells, padded to 256), so a request that fits is never short of cells, and each sequence's
attention sees only its own cells in position order: a greedy answer does not depend on what else is in the batch
(with the unified cache it does; see the tests). ``kv_unified=True`` is llama-server's default (one shared buffer).
Memory: the KV cache is ``n_seq`` times the serial engine's (SmolLM2-135M at n_ctx=4096, 4 slots: ~360 MiB f16).

LoRA adapters (``ModelSpec.loras``) are loaded with the model, once (a few MB each beside the base weights), and
applied at run time: ``set_adapters`` chooses the set (and scales) the next ``decode`` computes with. The set is the
whole context's, so a batch holds the tokens of one adapter set only; changing it makes llama.cpp reserve its
compute graph again at the next decode (a few ms on a CPU), which is why it is only called when the set changes.
"""

from __future__ import annotations

from typing import Any

from edgellm.serve.engine.detok import PieceTable
from edgellm.serve.engine.forced import DraftVocab
from edgellm.serve.engine.prompt import ChatTemplate
from edgellm.serve.engine.specs import ModelSpec
from edgellm.serve.engine.tokens import PromptTokenizer


class LlamaContext:
    """The loaded model and its context; ``close()`` frees both. Used by the scheduler thread, except
    ``tokenize`` (any thread)."""

    def __init__(
        self, spec: ModelSpec, n_seq: int, n_batch: int, kv_unified: bool = False, flash_attn: bool | None = None
    ) -> None:
        import llama_cpp as ll
        from llama_cpp._internals import LlamaModel
        from llama_cpp._logger import set_verbose

        self._ll = ll
        self.spec = spec
        set_verbose(False)  # as llama_cpp.Llama(verbose=False) does
        ll.llama_backend_init()

        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = spec.n_gpu_layers
        self.model = LlamaModel(path_model=str(spec.path), params=mparams, verbose=False)
        self.vocab = self.model.vocab
        self.n_vocab: int = self.model.n_vocab()

        threads = spec.threads()
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = spec.n_ctx * n_seq
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = kv_unified
        if flash_attn is not None:
            cparams.flash_attn_type = (
                ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
        cparams.no_perf = True
        self.ctx: Any = ll.llama_init_from_model(self.model.model, cparams)
        if not self.ctx:
            self.model.close()
            raise RuntimeError(f"llama_init_from_model failed for {spec.path} (n_ctx={cparams.n_ctx})")
        self._memory = ll.llama_get_memory(self.ctx)
        self._loras: list[Any] = []
        self._lora_key: tuple[tuple[int, float], ...] = ()

        try:
            metadata = self.model.metadata()
            self.prompts = PromptTokenizer.from_vocab(self.vocab, self.model, metadata.get("general.name", ""))
            self.template = ChatTemplate.for_model(metadata, self.prompts, spec.chat_template)
            is_eog = ll.llama_vocab_is_eog
            self.eog = frozenset(t for t in range(self.n_vocab) if is_eog(self.vocab, t))
            self.pieces = PieceTable(self.vocab, self.n_vocab)
            for path in spec.loras:
                adapter = ll.llama_adapter_lora_init(self.model.model, str(path).encode("utf-8"))
                if not adapter:
                    raise RuntimeError(
                        f"llama.cpp could not load the LoRA adapter {path} on {spec.path} (not a GGUF LoRA made for "
                        "this base? see `edgellm convert --lora`)"
                    )
                self._loras.append(adapter)
        except BaseException:
            self.close()
            raise

    def tokenize(self, text: str) -> list[int]:
        """A raw (completion) prompt's ids, as llama-server tokenizes it; chats go through ``template.tokens``."""
        return self.prompts.completion(text)

    def draft_vocab(self) -> DraftVocab:
        """The vocabulary as jump-forward drafts need it: pieces, plain-text tokenization, end-of-generation tokens
        and the end-of-turn token to draft where a grammar is complete."""
        eot = int(self._ll.llama_vocab_eot(self.vocab))
        if eot not in self.eog:
            eot = int(self._ll.llama_vocab_eos(self.vocab))
        prompts = self.prompts
        return DraftVocab(
            piece=self.pieces,
            encode=lambda text: prompts.encode(text, add_special=False, parse_special=False),
            eog=self.eog,
            eot=eot if eot in self.eog else None,
        )

    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers, in f16."""
        ll, m = self._ll, self.model.model
        n_head = max(1, ll.llama_model_n_head(m))
        head_dim = ll.llama_model_n_embd(m) // n_head
        return int(2 * ll.llama_model_n_layer(m) * head_dim * ll.llama_model_n_head_kv(m) * 2)

    def n_params(self) -> int:
        return max(1, int(self._ll.llama_model_n_params(self.model.model)))

    def set_threads(self, n: int) -> None:
        """Threads for the next decodes (generation and prompt batches)."""
        self._ll.llama_set_n_threads(self.ctx, n, n)

    @property
    def n_loras(self) -> int:
        return len(self._loras)

    @property
    def lora_key(self) -> tuple[tuple[int, float], ...]:
        """The adapter set the next decode applies."""
        return self._lora_key

    def set_adapters(self, key: tuple[tuple[int, float], ...]) -> None:
        """Apply the adapters ``key`` names (``(index in spec.loras, scale)``, canonical: ``slots.lora_key``) to
        the next decodes; () for the base alone."""
        if key == self._lora_key:
            return
        import ctypes

        ll = self._ll
        if key:
            adapters = (ll.llama_adapter_lora_p_ctypes * len(key))(*(self._loras[i] for i, _ in key))
            scales = (ctypes.c_float * len(key))(*(s for _, s in key))
            ll.llama_set_adapters_lora(self.ctx, adapters, len(key), scales)
        else:
            ll.llama_set_adapters_lora(self.ctx, None, 0, None)
        self._lora_key = key

    def decode(self, batch: Any) -> None:
        rc = self._ll.llama_decode(self.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for a batch of {batch.n_tokens} tokens")

    # -- KV memory (slots.KVMemory) ------------------------------------------------------------------------------
    def seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        return bool(self._ll.llama_memory_seq_rm(self._memory, seq_id, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        self._ll.llama_memory_seq_cp(self._memory, src, dst, p0, p1)

    def can_truncate(self) -> bool:
        """Whether a sequence's KV can lose its last positions (rejected draft tokens): not in recurrent or hybrid
        models, whose state is not per position (llama-server's ``common_context_can_seq_rm``)."""
        m = self.model.model
        return not (self._ll.llama_model_is_recurrent(m) or self._ll.llama_model_is_hybrid(m))

    def close(self) -> None:
        self._ll.llama_free(self.ctx)
        for adapter in self._loras:
            self._ll.llama_adapter_lora_free(adapter)
        self._loras.clear()
        self.model.close()


__all__ = ["LlamaContext"]
