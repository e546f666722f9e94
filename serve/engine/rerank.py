"""The reranker engine: score (query, document) pairs with a cross-encoder, on one of two backends.

- ``GGUFReranker`` (backend ``llama.cpp``): a cross-encoder GGUF made by ``edgellm convert`` from a
  sentence-transformers ``CrossEncoder`` directory, scored by llama.cpp with RANK pooling (``encoder.py``): the
  pairs of a request go into as few ``llama_decode`` calls as fit. No torch.
- ``CrossEncoderReranker`` (backend ``sentence-transformers``): any Hugging Face cross-encoder directory a user
  brings; imports torch.

Both return the same thing: the cross-encoder's logit through a sigmoid (``relevance_score`` in [0, 1]), or the raw
logit with ``raw_scores``; `load_reranker` picks the backend. Usable from Python without a server::

    reranker = load_reranker("llama.cpp", Path("models/reranker-minilm-l6-gguf/reranker-minilm-l6-f16.gguf"),
                             name="reranker")
    out = reranker.rerank("how do I copy a directory tree?", ["shutil.copytree ...", "json.dumps ..."], top_n=1)
    out.results[0].index, out.results[0].relevance_score

Importing this module imports neither torch, sentence-transformers nor llama_cpp; the constructors do. ``rerank``
is blocking and CPU-bound: an async caller runs it in a worker thread. Calls on one engine are serialized by a lock
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

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


RerankBackend = Literal["llama.cpp", "sentence-transformers"]


class Reranker(Protocol):
    """What the server needs from a reranker, whichever the backend."""

    name: str
    max_length: int
    max_documents: int

    def rerank(
        self,
        query: str,
        documents: list[str],
        *,
        top_n: int | None = None,
        raw_scores: bool = False,
        truncate: bool = True,
    ) -> RerankOutput: ...

    def close(self) -> None: ...


def backend_for(path: Path) -> RerankBackend:
    """The backend a reranker path implies: a ``.gguf`` file runs on llama.cpp, a directory on
    sentence-transformers."""
    return "llama.cpp" if Path(path).suffix == ".gguf" else "sentence-transformers"


def load_reranker(
    backend: RerankBackend | None,
    path: Path,
    *,
    name: str,
    max_documents: int = 1000,
    batch_size: int = 32,
    max_length: int | None = None,
    threads: int = 1,
    n_batch: int = 512,
) -> Reranker:
    """Load the reranker at ``path`` on ``backend`` (None: `backend_for(path)`). ``threads`` is llama.cpp's thread
    count (the sentence-transformers backend leaves torch's to the process, see the module docstring);
    ``batch_size`` is the sentence-transformers batch, ``n_batch`` llama.cpp's tokens per decode."""
    backend = backend or backend_for(path)
    if backend == "llama.cpp":
        return GGUFReranker(
            path, name=name, max_documents=max_documents, max_length=max_length, threads=threads, n_batch=n_batch
        )
    if backend == "sentence-transformers":
        return CrossEncoderReranker(
            path, name=name, max_documents=max_documents, batch_size=batch_size, max_length=max_length
        )
    raise RerankModelError(f"unknown reranker backend {backend!r}; expected 'llama.cpp' or 'sentence-transformers'")


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
            if not truncate and (error := _too_long(lengths, self.max_length)) is not None:
                raise error
            logits = self._model.predict(
                [(query, doc) for doc in documents],
                batch_size=self.batch_size,
                activation_fn=self._torch.nn.Identity(),
                show_progress_bar=False,
                convert_to_numpy=True,
            )
        return ranked(
            [float(x) for x in logits.reshape(-1)],
            top_n,
            raw_scores,
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
        validate_request(query, documents, top_n, self.max_documents)

    def _pair_lengths(self, query: str, documents: list[str]) -> list[int]:
        """Untruncated token counts of each (query, document) pair, special tokens included."""
        encoded = self._tokenizer(
            [query] * len(documents), documents, truncation=False, add_special_tokens=True, verbose=False
        )
        return [len(ids) for ids in encoded["input_ids"]]


class GGUFReranker:
    """A cross-encoder GGUF scored by llama.cpp with RANK pooling: ``[CLS] query [SEP] document [SEP]`` with the
    document as segment 1 (fed as input embeddings when the model's type rows differ, see ``encoder.py``), the
    classifier head on the pooled ``[CLS]`` (BERT's pooler, kept by ``edgellm convert``) giving one logit per pair.
    Pairs longer than ``max_length`` are cut as Hugging Face's fast tokenizers do (``longest_first``)."""

    def __init__(
        self,
        path: Path,
        *,
        name: str,
        max_documents: int = 1000,
        max_length: int | None = None,
        threads: int = 1,
        n_batch: int = 512,
        n_seq: int = 64,
        segment_ids: bool = True,
    ) -> None:
        if max_documents < 1:
            raise ValueError(f"max_documents must be at least 1, got {max_documents}")
        path = Path(path)
        if not path.is_file():
            raise RerankModelError(
                f"reranker model {path} does not exist; run `edgellm models pull reranker-gguf` for the default, or "
                "convert a sentence-transformers CrossEncoder directory with `edgellm convert DIR`"
            )
        _check_rank_gguf(path)
        from edgellm.serve.engine.encoder import EncoderLoadError, EncoderModel, read_segments

        try:
            model = EncoderModel(path, pooling="rank", n_batch=n_batch, n_seq=n_seq, n_threads=threads)
        except EncoderLoadError as e:
            raise RerankModelError(str(e)) from None
        if model.n_cls_out != 1:
            model.close()
            raise RerankModelError(
                f"{path} has {model.n_cls_out} classifier outputs; a reranker needs a cross-encoder with one "
                "relevance logit"
            )
        limit = model.max_tokens()
        if max_length is not None and max_length > limit:
            model.close()
            raise RerankModelError(f"max_length {max_length} is more than {path.name} takes here ({limit} tokens)")
        model.segments = read_segments(path) if segment_ids else None
        self._model: Any = model
        self._cls, self._sep = model.token_id("bos"), model.token_id("sep")
        self._lock = threading.Lock()
        self.name = name
        self.path = path
        self.max_length: int = max_length or limit
        self.max_documents = max_documents
        log.info(
            "reranker %s loaded from %s (llama.cpp, max_length %d, segment ids %s)",
            name,
            path,
            self.max_length,
            "as input embeddings" if model.segments is not None else "all zero (exact for this model)",
        )

    def rerank(
        self,
        query: str,
        documents: list[str],
        *,
        top_n: int | None = None,
        raw_scores: bool = False,
        truncate: bool = True,
    ) -> RerankOutput:
        """As `CrossEncoderReranker.rerank`."""
        validate_request(query, documents, top_n, self.max_documents)
        from edgellm.serve.engine.encoder import EncoderInput

        with self._lock:
            model = self._model
            if model is None:
                raise RerankError(f"reranker {self.name} is closed")
            q = model.tokenize(query, add_special=False)
            docs = [model.tokenize(d, add_special=False) for d in documents]
            lengths = [len(q) + len(d) + 3 for d in docs]
            if not truncate and (error := _too_long(lengths, self.max_length)) is not None:
                raise error
            inputs = []
            for d in docs:
                a, b = longest_first(len(q), len(d), self.max_length - 3)
                tokens = [self._cls, *q[:a], self._sep, *d[:b], self._sep]
                inputs.append(EncoderInput(tokens=tokens, segments=[0] * (a + 2) + [1] * (b + 1)))
            logits = model.run(inputs)[:, 0]
        return ranked(
            [float(x) for x in logits], top_n, raw_scores, prompt_tokens=sum(len(x.tokens) for x in inputs)
        )

    def close(self) -> None:
        """Free the model; later ``rerank`` calls raise :class:`RerankError`. Safe to call twice."""
        with self._lock:
            if self._model is not None:
                self._model.close()
                self._model = None

    def __enter__(self) -> GGUFReranker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def longest_first(n1: int, n2: int, max_length: int) -> tuple[int, int]:
    """Tokens kept of a pair of ``n1`` and ``n2`` content tokens within ``max_length``: Hugging Face's fast
    tokenizers' ``longest_first`` (the longer one is cut first; both to about half if both are long)."""
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


def _check_rank_gguf(path: Path) -> None:
    """Refuse a GGUF that is not a cross-encoder, or a BERT cross-encoder converted without its pooler (llama.cpp's
    converter drops ``pooler.dense``, which BertForSequenceClassification applies before its classifier)."""
    from edgellm.gguf import GGUFError, read_header

    try:
        header = read_header(path)
    except GGUFError as e:
        raise RerankModelError(str(e)) from None
    names = {t.name for t in header.tensors}
    if "cls.output.weight" not in names and "cls.weight" not in names:
        raise RerankModelError(
            f"{path} has no classification head (cls.output); it is not a cross-encoder. An embedding model goes "
            "in the `embedder` section"
        )
    if header.architecture == "bert" and "cls.output.weight" in names and "cls.weight" not in names:
        raise RerankModelError(
            f"{path} is a BERT cross-encoder converted without its pooler (pooler.dense), so its scores are not the "
            "model's; convert the sentence-transformers directory with `edgellm convert`, which keeps it"
        )


def validate_request(query: str, documents: Sequence[object], top_n: int | None, max_documents: int) -> None:
    if not isinstance(query, str) or not query.strip():
        raise RerankInputError("query is empty; send the text to rank the documents against")
    if not documents:
        raise RerankInputError("documents is empty; send at least one document to rank")
    if len(documents) > max_documents:
        raise RerankInputError(
            f"{len(documents)} documents is more than this reranker's limit of {max_documents}; "
            "send fewer per request or raise the limit in the server's configuration"
        )
    for i, doc in enumerate(documents):
        if not isinstance(doc, str):
            raise RerankInputError(f"documents[{i}] is a {type(doc).__name__}; each document must be text")
    if top_n is not None and top_n < 1:
        raise RerankInputError(f"top_n must be at least 1, got {top_n}")


def ranked(logits: list[float], top_n: int | None, raw_scores: bool, prompt_tokens: int) -> RerankOutput:
    """Documents best first (ties keep input order), cut to ``top_n``; scores are sigmoid(logit) or the logits."""
    scores = logits if raw_scores else [_sigmoid(x) for x in logits]
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if top_n is not None:
        order = order[:top_n]
    return RerankOutput(
        results=[RerankScore(index=i, relevance_score=scores[i]) for i in order], prompt_tokens=prompt_tokens
    )


def _too_long(lengths: list[int], limit: int) -> RerankInputError | None:
    too_long = [i for i, n in enumerate(lengths) if n > limit]
    if not too_long:
        return None
    i = too_long[0]
    return RerankInputError(
        f"documents[{i}] is {lengths[i]} tokens together with the query, more than the reranker's limit of {limit}"
        + (f" ({len(too_long)} documents are too long)" if len(too_long) > 1 else "")
        + "; shorten it or allow truncation"
    )


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
