"""A thin typed wrapper over llama.cpp's C API (through llama-cpp-python's ctypes bindings).

Benchmarks go through ``llama_decode`` on a preallocated ``llama_batch`` so the numbers are llama.cpp's speed,
not the high-level ``Llama`` class's Python overhead. Imported only inside the per-variant worker process.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import llama_cpp as L
import numpy as np


class LlamaError(RuntimeError):
    """llama.cpp refused a model, a context or a batch."""


@L.llama_log_callback
def _quiet_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    return None


def silence_llama_logs() -> None:
    """Route llama.cpp's own log lines to nowhere (the worker reports through its JSON protocol)."""
    L.llama_log_set(_quiet_log, ctypes.c_void_p(0))


class LlamaRunner:
    """One model and one context; decode token batches and read their logits.

    ``n_batch`` is the largest batch decoded at once (a 512-token prompt is one batch, as in llama-bench).
    ``repack`` enables llama.cpp's extra CPU buffer types (weight repacking, AMX); the default of llama-bench.
    """

    def __init__(self, path: Path, n_ctx: int, n_batch: int, n_threads: int, repack: bool = True) -> None:
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        mparams.use_extra_bufts = repack
        t0 = time.perf_counter()
        model = L.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise LlamaError(f"llama.cpp could not load {path}")
        cparams = L.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.no_perf = True
        ctx = L.llama_init_from_model(model, cparams)
        if not ctx:
            L.llama_model_free(model)
            raise LlamaError(f"llama.cpp could not create a context (n_ctx={n_ctx}, n_batch={n_batch}) for {path}")
        self.load_seconds = time.perf_counter() - t0
        self.model = model
        self.ctx = ctx
        self.n_batch = n_batch
        self.n_threads = n_threads
        self.vocab = L.llama_model_get_vocab(model)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        self.bos = int(L.llama_vocab_bos(self.vocab))
        self._batch = L.llama_batch_init(n_batch, 0, 1)

    # -- model facts -------------------------------------------------------------------------------------------

    def n_params(self) -> int:
        return int(L.llama_model_n_params(self.model))

    def tensor_bytes(self) -> int:
        """Bytes of all weight tensors (what llama.cpp uses for bits per weight)."""
        return int(L.llama_model_size(self.model))

    def desc(self) -> str:
        buf = ctypes.create_string_buffer(256)
        L.llama_model_desc(self.model, buf, len(buf))
        return buf.value.decode(errors="replace")

    # -- tokens ------------------------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Tokenize like llama-perplexity: the model's own BOS rule, no special-token parsing."""
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, True, False)
        if n < 0:
            raise LlamaError(f"tokenizer needs {-n} slots, had {cap}")
        return list(buf[:n])

    # -- decoding ----------------------------------------------------------------------------------------------

    def clear(self) -> None:
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)

    def decode(self, tokens: Sequence[int], pos0: int = 0, outputs: Sequence[bool] | None = None) -> None:
        """Decode one batch of tokens on sequence 0 at positions ``pos0...``.

        ``outputs`` marks the rows whose logits are computed; by default only the last row (as a prompt is).
        """
        n = len(tokens)
        if not 0 < n <= self.n_batch:
            raise LlamaError(f"batch of {n} tokens; this context takes 1..{self.n_batch}")
        b = self._batch
        for i, tok in enumerate(tokens):
            b.token[i] = tok
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = (i == n - 1) if outputs is None else bool(outputs[i])
        b.n_tokens = n
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise LlamaError(f"llama_decode returned {rc} for a batch of {n} tokens at position {pos0}")
        L.llama_synchronize(self.ctx)

    def decode_one(self, token: int, pos: int) -> None:
        """Decode a single token with logits (one generation step); the batch's fixed fields are set here."""
        b = self._batch
        b.token[0] = token
        b.pos[0] = pos
        b.n_seq_id[0] = 1
        b.seq_id[0][0] = 0
        b.logits[0] = 1
        b.n_tokens = 1
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise LlamaError(f"llama_decode returned {rc} for one token at position {pos}")
        L.llama_synchronize(self.ctx)

    def logits(self, n_outputs: int) -> np.ndarray:
        """A copy of the last decode's logits, ``(n_outputs, n_vocab)`` float32, in batch order."""
        ptr = L.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_outputs, self.n_vocab)).copy()

    # -- lifetime ----------------------------------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            L.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "ctx", None):
            L.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            L.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> LlamaRunner:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
