"""The reranker engine: score (query, document) pairs with a sentence-transformers cross-encoder.

Usable from Python without a server::

    reranker = CrossEncoderReranker(Path("models/reranker-minilm-l6"), name="reranker")
    out = reranker.rerank("how do I copy a directory tree?", ["shutil.copytree ...", "json.dumps ..."], top_n=1)
    out.results[0].index, out.results[0].relevance_score

Importing this module imports neither torch nor sentence-transformers; the constructor does. ``rerank`` is
blocking and CPU-bound: an async caller runs it in a worker thread. Calls on one engine are serialized by a lock
(the tokenizer is not safe to share between threads, and two batches at once only fight over the same cores).

The reranker does not set torch's thread count: ``torch.set_num_threads`` is process-wide (and torch shares one
OpenMP runtime with llama.cpp), so it belongs to the process that owns the cores: the server sets it in its lifespan
(``reranker.threads`` in the serve settings); a script calls it itself if it wants to.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgellm.errors import EdgeLLMError

log = logging.getLogger(__name__)


class RerankError(EdgeLLMError):
    """The reranker cannot do what was asked; the message says why and what to do."""


class RerankInputError(RerankError):
    """The request is invalid (empty query, no documents, too many, too long): the caller's to fix (HTTP 400)."""


class RerankModelError(RerankError):
    """The model directory is missing or is not a single-score cross-encoder (a configuration problem)."""


@dataclass
class RerankScore:
    index: int
    """Position of the document in the request."""
    relevance_score: float
    """Sigmoid of the cross-encoder logit, in [0, 1]; the raw logit when ``raw_scores`` was asked for."""


@dataclass
class RerankOutput:
    results: list[RerankScore]
    """Best first, cut to ``top_n``."""
    prompt_tokens: int
    """Tokens of all (query, document) pairs as fed to the model (after truncation, with special tokens)."""


class CrossEncoderReranker:
    """A cross-encoder loaded from a local directory (sentence-transformers ``CrossEncoder`` format or a plain
    Hugging Face ``*ForSequenceClassification`` checkpoint with one label)."""

    def __init__(
        self,
        model_dir: Path,
        *,
        name: str,
        max_documents: int = 1000,
        batch_size: int = 32,
        max_length: int | None = None,
        device: str = "cpu",
    ) -> None:
        if max_documents < 1:
            raise ValueError(f"max_documents must be at least 1, got {max_documents}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise RerankModelError(
                f"reranker model directory {model_dir} has no config.json; run `edgellm models pull reranker` "
                "for the default cross-encoder, or point the reranker's model_dir at a local cross-encoder "
                "(e.g. a downloaded cross-encoder/ms-marco-MiniLM-L-6-v2)"
            )
        _check_is_cross_encoder(model_dir)

        import torch
        from sentence_transformers import CrossEncoder

        self._torch = torch
        self._model: Any = CrossEncoder(
            str(model_dir), device=device, max_length=max_length, local_files_only=True
        )
        if self._model.num_labels != 1:
            raise RerankModelError(
                f"{model_dir} is a classifier with {self._model.num_labels} labels; a reranker needs a "
                "cross-encoder with one relevance logit"
            )
        positions = getattr(self._model.config, "max_position_embeddings", None)
        model_max = self._model.max_seq_length
        if max_length is not None and positions is not None and max_length > positions:
            raise RerankModelError(
                f"max_length {max_length} is more than {model_dir} supports ({positions} tokens)"
            )
        if model_max is None or model_max > 1_000_000:  # tokenizers without a recorded limit
            model_max = positions or 512
            self._model.max_seq_length = model_max
        self._tokenizer = self._model.tokenizer
        self._lock = threading.Lock()
        self.name = name
        self.max_length: int = int(model_max)
        self.max_documents = max_documents
        self.batch_size = batch_size
        self.model_dir = model_dir
        log.info("reranker %s loaded from %s (max_length %d, %s)", name, model_dir, self.max_length, device)

    def rerank(
        self,
        query: str,
        documents: list[str],
        *,
        top_n: int | None = None,
        raw_scores: bool = False,
        truncate: bool = True,
    ) -> RerankOutput:
        """Score every document against ``query``; return them best first (ties keep input order), cut to
        ``top_n``. Documents longer than ``max_length`` tokens (with the query) are truncated, or rejected with
        :class:`RerankInputError` when ``truncate`` is false."""
        self._validate(query, documents, top_n)
        with self._lock:
            if self._model is None:
                raise RerankError(f"reranker {self.name} is closed")
            lengths = self._pair_lengths(query, documents)
            if not truncate:
                too_long = [i for i, n in enumerate(lengths) if n > self.max_length]
                if too_long:
                    i = too_long[0]
                    raise RerankInputError(
                        f"documents[{i}] is {lengths[i]} tokens together with the query, more than the "
                        f"reranker's limit of {self.max_length}"
                        + (f" ({len(too_long)} documents are too long)" if len(too_long) > 1 else "")
                        + "; shorten it or allow truncation"
                    )
            logits = self._model.predict(
                [(query, doc) for doc in documents],
                batch_size=self.batch_size,
                activation_fn=self._torch.nn.Identity(),
                show_progress_bar=False,
                convert_to_numpy=True,
            )
        values = [float(x) for x in logits.reshape(-1)]
        scores = values if raw_scores else [_sigmoid(x) for x in values]
        order = sorted(range(len(documents)), key=lambda i: (-scores[i], i))
        if top_n is not None:
            order = order[:top_n]
        return RerankOutput(
            results=[RerankScore(index=i, relevance_score=scores[i]) for i in order],
            prompt_tokens=sum(min(n, self.max_length) for n in lengths),
        )

    def close(self) -> None:
        """Release the model; later ``rerank`` calls raise :class:`RerankError`. Safe to call twice."""
        with self._lock:
            self._model = None
            self._tokenizer = None

    def __enter__(self) -> CrossEncoderReranker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _validate(self, query: str, documents: list[str], top_n: int | None) -> None:
        if not isinstance(query, str) or not query.strip():
            raise RerankInputError("query is empty; send the text to rank the documents against")
        if not documents:
            raise RerankInputError("documents is empty; send at least one document to rank")
        if len(documents) > self.max_documents:
            raise RerankInputError(
                f"{len(documents)} documents is more than this reranker's limit of {self.max_documents}; "
                "send fewer per request or raise the limit in the server's configuration"
            )
        for i, doc in enumerate(documents):
            if not isinstance(doc, str):
                raise RerankInputError(
                    f"documents[{i}] is a {type(doc).__name__}; each document must be text"
                )
        if top_n is not None and top_n < 1:
            raise RerankInputError(f"top_n must be at least 1, got {top_n}")

    def _pair_lengths(self, query: str, documents: list[str]) -> list[int]:
        """Untruncated token counts of each (query, document) pair, special tokens included."""
        encoded = self._tokenizer(
            [query] * len(documents), documents, truncation=False, add_special_tokens=True, verbose=False
        )
        return [len(ids) for ids in encoded["input_ids"]]


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def _check_is_cross_encoder(model_dir: Path) -> None:
    """Refuse a bi-encoder (sentence-transformers would silently bolt a random head onto it)."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RerankModelError(f"{model_dir / 'config.json'} cannot be read: {e}") from None
    architectures = config.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise RerankModelError(
            f"{model_dir} is not a cross-encoder (architectures: {architectures or 'none recorded'}); "
            "a reranker needs a *ForSequenceClassification model, e.g. cross-encoder/ms-marco-MiniLM-L-6-v2 "
            "or the default from `edgellm models pull reranker`"
        )
