"""A BERT-family GGUF loaded by llama.cpp for pooled outputs: sentence embeddings (mean, CLS or last-token pooling)
or cross-encoder scores (RANK pooling). What the embedder (``embed.py``) and the GGUF reranker (``rerank.py``) run on.

Many sequences go into one ``llama_decode``: each gets its own sequence id (attention is masked per sequence, and
pooling is per sequence), packed up to ``n_batch`` tokens and ``n_seq`` sequences per decode. An encoder has no KV
cache to keep between calls, and every sequence must fit one micro-batch (non-causal attention sees it whole), so
``n_ubatch == n_batch`` and a sequence is at most ``n_batch`` tokens. Attention in a micro-batch costs
``n_batch^2`` whatever the packing, which is why ``n_batch`` stays moderate (512 by default: for MiniLM the masked
attention then adds about a fifth to the cost of the dense layers).

**Token types.** llama.cpp's BERT graph adds row 0 of ``token_types`` to every position ("token types are hardcoded
to zero": ``llama_batch`` carries no segment ids). A cross-encoder is trained with segment 1 on the document, and
scoring it as all-segment-0 changes its ranking. When the model's type rows differ, a sequence with segment ids is
fed as input embeddings instead of token ids: ``token_embd[id] + token_types[segment] - token_types[0]`` (llama.cpp
still adds row 0 and the positions), which is what Hugging Face computes. The two tensors are read from the GGUF
with gguf-py (``edgellm/segments.py``, shared with convert's verification runner; memory-mapped, dequantized once
if quantized).

Not thread-safe: one caller at a time (the embedder and reranker hold a lock). Importing this module is cheap; the
constructor imports llama_cpp.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.segments import Segments, read_segments

log = logging.getLogger(__name__)

# llama.cpp's enum llama_pooling_type
POOLING_NAMES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
POOLING_TYPES = {name: value for value, name in POOLING_NAMES.items()}


class EncoderLoadError(RuntimeError):
    """The GGUF cannot be loaded as an encoder (missing file, wrong kind of model, context creation failed)."""


@dataclass(frozen=True)
class EncoderInput:
    """One input: token ids, and segment ids (None: all segment 0)."""

    tokens: Sequence[int]
    segments: Sequence[int] | None = None


class EncoderModel:
    """A GGUF encoder and its llama context: ``run`` turns sequences into one pooled vector each (``n_out``
    floats: the embedding size, or the number of classifier outputs with RANK pooling)."""

    def __init__(
        self,
        path: Path,
        *,
        pooling: str | None = None,
        n_batch: int = 512,
        n_seq: int = 64,
        n_threads: int = 1,
        n_gpu_layers: int = 0,
    ) -> None:
        import llama_cpp as ll
        from llama_cpp._internals import LlamaModel
        from llama_cpp._logger import set_verbose

        path = Path(path)
        if not path.is_file():
            raise EncoderLoadError(f"{path}: no such GGUF file")
        self._ll = ll
        set_verbose(False)
        ll.llama_backend_init()
        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        try:
            self.model = LlamaModel(path_model=str(path), params=mparams, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise EncoderLoadError(f"llama.cpp cannot load {path}: {e}") from e
        m = self.model.model
        self.path = path
        self.vocab = self.model.vocab
        self.n_vocab: int = self.model.n_vocab()
        self.n_embd: int = int(ll.llama_model_n_embd(m))
        self.n_cls_out: int = int(ll.llama_model_n_cls_out(m))
        self.context_length: int = int(ll.llama_model_n_ctx_train(m))

        cparams = ll.llama_context_default_params()
        self.n_batch = n_batch
        self.n_seq = n_seq
        cparams.n_ctx = n_batch
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq
        cparams.kv_unified = True  # any sequence may use the whole batch
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.embeddings = True
        if pooling is not None:
            cparams.pooling_type = POOLING_TYPES[pooling]
        cparams.no_perf = True
        self.ctx: Any = ll.llama_init_from_model(m, cparams)
        if not self.ctx:
            self.model.close()
            raise EncoderLoadError(f"llama_init_from_model failed for {path} (n_batch={n_batch}, n_seq={n_seq})")
        self.pooling: str = POOLING_NAMES.get(int(ll.llama_pooling_type(self.ctx)), "unknown")
        self.n_out = self.n_cls_out if self.pooling == "rank" else self.n_embd
        self._memory = ll.llama_get_memory(self.ctx)
        self._token_batch: Any = None
        self._embd_batch: Any = None
        self.segments: Segments | None = None

    # -- tokens --------------------------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """llama.cpp's tokenizer (WordPiece for BERT): with ``add_special``, ``[CLS] ... [SEP]``."""
        return list(self.model.tokenize(text.encode("utf-8"), add_bos=add_special, special=False))

    def token_id(self, which: str) -> int:
        ll = self._ll
        return int({"bos": ll.llama_vocab_bos, "eos": ll.llama_vocab_eos, "sep": ll.llama_vocab_sep}[which](self.vocab))

    # -- decoding ------------------------------------------------------------------------------------------------

    def max_tokens(self) -> int:
        """The longest sequence this context takes: the batch, and the model's trained positions."""
        return min(self.n_batch, self.context_length) if self.context_length > 0 else self.n_batch

    def run(self, sequences: Sequence[EncoderInput]) -> Any:
        """One pooled output per sequence (float32 ``[len(sequences), n_out]``), packed into as few decodes as the
        batch allows. Every sequence must be 1 to ``max_tokens()`` tokens long."""
        out = np.empty((len(sequences), self.n_out), dtype=np.float32)
        limit = self.max_tokens()
        for i, s in enumerate(sequences):
            if not 0 < len(s.tokens) <= limit:
                raise ValueError(f"sequence {i} has {len(s.tokens)} tokens; 1 to {limit} fit")
        for group in self.pack([len(s.tokens) for s in sequences]):
            self._decode([sequences[i] for i in group], out, group)
        return out

    def pack(self, lengths: Sequence[int]) -> Iterator[list[int]]:
        """Indices of sequences grouped into decodes of at most ``n_batch`` tokens and ``n_seq`` sequences, in
        input order."""
        group: list[int] = []
        used = 0
        for i, n in enumerate(lengths):
            if group and (used + n > self.n_batch or len(group) == self.n_seq):
                yield group
                group, used = [], 0
            group.append(i)
            used += n
        if group:
            yield group

    def _decode(self, seqs: list[EncoderInput], out: Any, rows: list[int]) -> None:
        ll = self._ll
        use_embd = self.segments is not None and any(s.segments is not None for s in seqs)
        batch = self._batch(use_embd)
        n = 0
        for sid, s in enumerate(seqs):
            k = len(s.tokens)
            if use_embd:
                assert self.segments is not None
                view = np.ctypeslib.as_array(batch.embd, shape=(self.n_batch, self.n_embd))
                segs = s.segments if s.segments is not None else [0] * k
                self.segments.embed(s.tokens, segs, view[n : n + k])
            else:
                np.ctypeslib.as_array(batch.token, shape=(self.n_batch,))[n : n + k] = s.tokens
            np.ctypeslib.as_array(batch.pos, shape=(self.n_batch,))[n : n + k] = np.arange(k)
            np.ctypeslib.as_array(batch.n_seq_id, shape=(self.n_batch,))[n : n + k] = 1
            np.ctypeslib.as_array(batch.logits, shape=(self.n_batch,))[n : n + k] = 1
            for j in range(n, n + k):
                batch.seq_id[j][0] = sid
            n += k
        batch.n_tokens = n
        if self._memory:
            ll.llama_memory_clear(self._memory, True)
        rc = ll.llama_decode(self.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for {len(seqs)} sequences of {n} tokens")
        for sid, row in enumerate(rows):
            ptr = ll.llama_get_embeddings_seq(self.ctx, sid)
            if not ptr:
                raise RuntimeError(f"llama.cpp returned no pooled output for sequence {sid}")
            out[row] = np.ctypeslib.as_array(ptr, shape=(self.n_out,))

    def _batch(self, embd: bool) -> Any:
        ll = self._ll
        if embd:
            if self._embd_batch is None:
                self._embd_batch = ll.llama_batch_init(self.n_batch, self.n_embd, 1)
            return self._embd_batch
        if self._token_batch is None:
            self._token_batch = ll.llama_batch_init(self.n_batch, 0, 1)
        return self._token_batch

    def close(self) -> None:
        ll = self._ll
        for name in ("_token_batch", "_embd_batch"):
            batch = getattr(self, name)
            if batch is not None:
                ll.llama_batch_free(batch)
                setattr(self, name, None)
        if self.ctx is not None:
            ll.llama_free(self.ctx)
            self.ctx = None
            self.model.close()


__all__ = ["POOLING_NAMES", "EncoderLoadError", "EncoderModel", "Segments", "EncoderInput", "read_segments"]
