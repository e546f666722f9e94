"""A BERT-family GGUF run by llama.cpp for pooled outputs, one sequence per decode: what the encoder parity checks
score with (the serving engine, ``edgellm.serve.engine.encoder``, packs many sequences per decode; the tests check
that it agrees with sentence-transformers too).

    with EncoderRunner(Path("minilm-f16.gguf")) as m:
        m.embed([101, 7592, 102])                               # mean-pooled vector, [n_embd]
    with EncoderRunner(Path("reranker-f16.gguf"), pooling="rank") as m:
        m.score(query_ids, document_ids)                        # the cross-encoder's logit

Token types: llama.cpp adds ``token_types`` row 0 everywhere; a pair's document is segment 1 in Hugging Face, so when
the rows differ the pair goes in as input embeddings ``token_embd[id] + token_types[s] - token_types[0]``.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from types import TracebackType

import numpy as np

from edgellm.convert.llamacpp import ConvertError
from edgellm.segments import read_segments

_POOLING = {"mean": 1, "cls": 2, "last": 3, "rank": 4}


class EncoderRunner:
    def __init__(self, path: Path, pooling: str | None = None, n_ctx: int = 512, n_threads: int | None = None) -> None:
        import llama_cpp as ll
        from llama_cpp._internals import LlamaModel
        from llama_cpp._logger import set_verbose

        from edgellm.hardware import default_threads

        self._ll = ll
        self.path = Path(path)
        set_verbose(False)
        ll.llama_backend_init()
        mparams = ll.llama_model_default_params()
        mparams.use_extra_bufts = False  # see convert.runner: the plain CPU layout
        try:
            self._model = LlamaModel(path_model=str(self.path), params=mparams, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise ConvertError(f"llama.cpp cannot load {self.path.name}: {e}") from e
        m = self._model.model
        self.n_embd = int(ll.llama_model_n_embd(m))
        self.n_ctx = min(n_ctx, int(ll.llama_model_n_ctx_train(m)) or n_ctx)
        threads = n_threads or default_threads()
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = self.n_ctx
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.embeddings = True
        if pooling is not None:
            cparams.pooling_type = _POOLING[pooling]
        cparams.no_perf = True
        self._ctx = ll.llama_init_from_model(m, cparams)
        if not self._ctx:
            self._model.close()
            raise ConvertError(f"llama.cpp cannot make an embedding context for {self.path.name}")
        self.pooling = int(ll.llama_pooling_type(self._ctx))
        self.n_out = int(ll.llama_model_n_cls_out(m)) if self.pooling == _POOLING["rank"] else self.n_embd
        self._tokens = ll.llama_batch_init(self.n_ctx, 0, 1)
        self._embd = ll.llama_batch_init(self.n_ctx, self.n_embd, 1)
        self._segments = read_segments(self.path)
        self.cls = int(ll.llama_vocab_bos(self._model.vocab))
        self.sep = int(ll.llama_vocab_sep(self._model.vocab))

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return list(self._model.tokenize(text.encode("utf-8"), add_bos=add_special, special=False))

    def embed(self, tokens: list[int]) -> np.ndarray:
        """The pooled output of one token sequence (all segment 0)."""
        return self._run(tokens, None)

    def score(self, query: list[int], document: list[int], max_length: int | None = None) -> float:
        """The cross-encoder logit of ``[CLS] query [SEP] document [SEP]`` (document as segment 1), the pair cut
        to ``max_length`` tokens as Hugging Face's fast tokenizers cut (``longest_first``)."""
        a, b = _longest_first(len(query), len(document), (max_length or self.n_ctx) - 3)
        q, d = list(query)[:a], list(document)[:b]
        tokens = [self.cls, *q, self.sep, *d, self.sep]
        segments = [0] * (len(q) + 2) + [1] * (len(d) + 1)
        return float(self._run(tokens, segments)[0])

    def _run(self, tokens: list[int], segments: list[int] | None) -> np.ndarray:
        ll = self._ll
        n = len(tokens)
        if not 0 < n <= self.n_ctx:
            raise ConvertError(f"{self.path.name}: a sequence of {n} tokens does not fit {self.n_ctx}")
        use_embd = segments is not None and self._segments is not None
        batch = self._embd if use_embd else self._tokens
        for i, t in enumerate(tokens):
            if not use_embd:
                batch.token[i] = t
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        if use_embd:
            assert segments is not None and self._segments is not None
            rows = np.empty((n, self.n_embd), dtype=np.float32)
            self._segments.embed(tokens, segments, rows)
            ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)
        batch.n_tokens = n
        memory = ll.llama_get_memory(self._ctx)
        if memory:
            ll.llama_memory_clear(memory, True)
        if ll.llama_decode(self._ctx, batch) != 0:
            raise ConvertError(f"{self.path.name}: llama_decode failed on {n} tokens")
        ptr = ll.llama_get_embeddings_seq(self._ctx, 0)
        if not ptr:
            raise ConvertError(f"{self.path.name}: llama.cpp returned no pooled output (pooling {self.pooling})")
        return np.ctypeslib.as_array(ptr, shape=(self.n_out,)).copy()

    def close(self) -> None:
        ll = self._ll
        for name in ("_tokens", "_embd"):
            if (batch := self.__dict__.pop(name, None)) is not None:
                ll.llama_batch_free(batch)
        if (ctx := self.__dict__.pop("_ctx", None)) is not None:
            ll.llama_free(ctx)
        if (model := self.__dict__.pop("_model", None)) is not None:
            model.close()

    def __enter__(self) -> EncoderRunner:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _longest_first(n1: int, n2: int, max_length: int) -> tuple[int, int]:
    if n1 + n2 <= max_length:
        return n1, n2
    swap = n1 > n2
    if swap:
        n1, n2 = n2, n1
    n2 = n1 if n1 > max_length else max(n1, max_length - n1)
    if n1 + n2 > max_length:
        n1 = max_length // 2
        n2 = n1 + max_length % 2
    return (n2, n1) if swap else (n1, n2)
