"""The embedding engine: sentence embeddings from a GGUF encoder (all-MiniLM-L6-v2 by default), run by llama.cpp
with the model's own pooling and L2-normalized (``GGUFEmbedder``, backend ``llama.cpp``); or from any
sentence-transformers model directory (``SentenceTransformerEmbedder``, backend ``sentence-transformers``, imports
torch; text input only). `load_embedder` picks the backend. Usable from Python without a server::

    embedder = GGUFEmbedder(Path("models/all-minilm-l6-v2-gguf/all-minilm-l6-v2-f16.gguf"), name="minilm")
    out = embedder.embed(["how do I copy a folder?", "shutil.copytree copies a directory tree"])
    out.vectors  # float32 [2, 384], unit length
    out.prompt_tokens

Inputs are text or token ids of this model's vocabulary (the OpenAI API's token-array input; used as given, so
send ``[CLS] ... [SEP]`` yourself for a BERT model). Many inputs go into one ``llama_decode`` where they fit
(``n_batch`` tokens, ``n_seq`` inputs). ``embed`` is blocking and CPU-bound: an async caller runs it in a worker
thread; calls are serialized by a lock. Importing this module imports neither llama_cpp nor torch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from edgellm.errors import EdgeLLMError
from edgellm.serve.engine.base import ContextOverflowError, InvalidPromptError

log = logging.getLogger(__name__)

EMBEDDING_POOLINGS = ("mean", "cls", "last")
EmbedBackend = Literal["llama.cpp", "sentence-transformers"]


class EmbedInputError(InvalidPromptError):
    """The input is invalid (empty, too many items, token ids outside the vocabulary): 400."""


class EmbedTooLongError(ContextOverflowError):
    """An input is longer than the model takes and truncation is off: 400 exceed_context_size_error."""


class EmbedModelError(EdgeLLMError):
    """The file is not an embedding model llama.cpp can pool (a configuration problem)."""


@dataclass(frozen=True)
class EmbedOutput:
    vectors: Any
    """float32 ``[n_inputs, dimensions]``, in input order; unit length when the embedder normalizes."""
    prompt_tokens: int
    """Tokens fed to the model over all inputs (after truncation, special tokens included)."""


class Embedder(Protocol):
    """What the server needs from an embedder, whichever the backend."""

    name: str
    path: Path
    dimensions: int
    max_length: int

    def embed(
        self, inputs: Sequence[str] | Sequence[Sequence[int]], *, truncate: bool | None = None
    ) -> EmbedOutput: ...

    def close(self) -> None: ...


def load_embedder(
    backend: EmbedBackend | None,
    path: Path,
    *,
    name: str,
    max_inputs: int = 2048,
    max_length: int | None = None,
    truncate: bool = True,
    normalize: bool = True,
    pooling: str | None = None,
    n_batch: int = 512,
    threads: int = 1,
    batch_size: int = 32,
) -> Embedder:
    """Load the embedding model at ``path`` on ``backend`` (None: llama.cpp for a ``.gguf`` file, else
    sentence-transformers). ``pooling``, ``n_batch`` and ``threads`` are llama.cpp's; ``batch_size`` is
    sentence-transformers' (whose torch threads the process sets, as for the reranker)."""
    backend = backend or ("llama.cpp" if Path(path).suffix == ".gguf" else "sentence-transformers")
    if backend == "llama.cpp":
        return GGUFEmbedder(
            path, name=name, max_inputs=max_inputs, max_length=max_length, truncate=truncate, normalize=normalize,
            pooling=pooling, n_batch=n_batch, threads=threads,
        )
    if backend == "sentence-transformers":
        return SentenceTransformerEmbedder(
            path, name=name, max_inputs=max_inputs, max_length=max_length, truncate=truncate, normalize=normalize,
            batch_size=batch_size,
        )
    raise EmbedModelError(f"unknown embedder backend {backend!r}; expected 'llama.cpp' or 'sentence-transformers'")


class GGUFEmbedder:
    """An embedding GGUF (BERT-family) loaded by llama.cpp. ``pooling`` overrides the file's pooling type (mean,
    cls or last); ``max_length`` caps the tokens of one input (default: the model's trained positions, at most
    ``n_batch``)."""

    def __init__(
        self,
        path: Path,
        *,
        name: str,
        max_inputs: int = 2048,
        max_length: int | None = None,
        truncate: bool = True,
        normalize: bool = True,
        pooling: str | None = None,
        n_batch: int = 512,
        n_seq: int = 64,
        threads: int = 1,
    ) -> None:
        if max_inputs < 1:
            raise ValueError(f"max_inputs must be at least 1, got {max_inputs}")
        if pooling is not None and pooling not in EMBEDDING_POOLINGS:
            raise EmbedModelError(f"pooling must be one of {EMBEDDING_POOLINGS}, got {pooling!r}")
        path = Path(path)
        if not path.is_file():
            raise EmbedModelError(
                f"embedding model {path} does not exist; run `edgellm models pull embedder` for the default "
                "(all-MiniLM-L6-v2 converted to GGUF), or convert a sentence-transformers model with `edgellm convert`"
            )
        from edgellm.serve.engine.encoder import EncoderLoadError, EncoderModel

        try:
            self._model: EncoderModel | None = EncoderModel(
                path, pooling=pooling, n_batch=n_batch, n_seq=n_seq, n_threads=threads
            )
        except EncoderLoadError as e:
            raise EmbedModelError(str(e)) from None
        model = self._model
        if model.pooling not in EMBEDDING_POOLINGS:
            model.close()
            hint = (
                "it is a cross-encoder (rank pooling): configure it as the reranker"
                if model.pooling == "rank"
                else "set `pooling: mean` (or cls, last) for this model"
            )
            raise EmbedModelError(f"{path} has no embedding pooling ({model.pooling}); {hint}")
        limit = model.max_tokens()
        if max_length is not None and max_length > limit:
            model.close()
            raise EmbedModelError(f"max_length {max_length} is more than {path.name} takes here ({limit} tokens)")
        self.name = name
        self.path = path
        self.dimensions: int = model.n_embd
        self.max_length: int = max_length or limit
        self.max_inputs = max_inputs
        self.truncate = truncate
        self.normalize = normalize
        self.pooling = model.pooling
        self.n_vocab = model.n_vocab
        self._sep = model.token_id("sep")
        self._lock = threading.Lock()
        log.info(
            "embedder %s loaded from %s (%d dimensions, %s pooling, max_length %d)",
            name,
            path,
            self.dimensions,
            self.pooling,
            self.max_length,
        )

    def embed(self, inputs: Sequence[str] | Sequence[Sequence[int]], *, truncate: bool | None = None) -> EmbedOutput:
        """Embed every input (text, or token ids of this model); vectors in input order. An input longer than
        ``max_length`` tokens is cut to it (keeping the final ``[SEP]``) or, with ``truncate`` off, refused with
        :class:`EmbedTooLongError`."""
        import numpy as np

        truncate = self.truncate if truncate is None else truncate
        self._validate(inputs)
        with self._lock:
            model = self._model
            if model is None:
                raise EmbedModelError(f"embedder {self.name} is closed")
            from edgellm.serve.engine.encoder import EncoderInput

            items: Sequence[str | Sequence[int]] = inputs
            token_lists = [self._tokens(model, x, i) for i, x in enumerate(items)]
            for i, tokens in enumerate(token_lists):
                if len(tokens) > self.max_length:
                    if not truncate:
                        raise EmbedTooLongError(
                            f"input[{i}] is {len(tokens)} tokens, more than this embedder's limit of "
                            f"{self.max_length}; shorten it or allow truncation",
                            len(tokens),
                            self.max_length,
                        )
                    token_lists[i] = self._cut(tokens)
            vectors = model.run([EncoderInput(tokens=t) for t in token_lists])
        if self.normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        return EmbedOutput(vectors=vectors, prompt_tokens=sum(len(t) for t in token_lists))

    def count_tokens(self, text: str) -> int:
        with self._lock:
            if self._model is None:
                raise EmbedModelError(f"embedder {self.name} is closed")
            return len(self._model.tokenize(text, add_special=True))

    def close(self) -> None:
        """Free the model; later ``embed`` calls raise :class:`EmbedModelError`. Safe to call twice."""
        with self._lock:
            if self._model is not None:
                self._model.close()
                self._model = None

    def __enter__(self) -> GGUFEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _validate(self, inputs: Sequence[str] | Sequence[Sequence[int]]) -> None:
        if not inputs:
            raise EmbedInputError("input is empty; send a string, a list of strings or a list of token arrays")
        if len(inputs) > self.max_inputs:
            raise EmbedInputError(
                f"{len(inputs)} inputs is more than this embedder's limit of {self.max_inputs} per request; "
                "send fewer or raise embedder.max_inputs"
            )

    def _tokens(self, model: Any, x: str | Sequence[int], i: int) -> list[int]:
        if isinstance(x, str):
            if not x:
                raise EmbedInputError(f"input[{i}] is an empty string")
            return model.tokenize(x, add_special=True)  # type: ignore[no-any-return]
        tokens = list(x)
        if not tokens:
            raise EmbedInputError(f"input[{i}] is an empty token array")
        bad = [t for t in tokens if not 0 <= t < self.n_vocab]
        if bad:
            raise EmbedInputError(
                f"input[{i}] has token id {bad[0]} outside this model's vocabulary (0 to {self.n_vocab - 1}); "
                "token arrays are ids of the embedding model's own tokenizer"
            )
        return tokens

    def _cut(self, tokens: list[int]) -> list[int]:
        """The first ``max_length`` tokens, ending with ``[SEP]`` if the input did (as Hugging Face truncates)."""
        if tokens[-1] == self._sep:
            return [*tokens[: self.max_length - 1], self._sep]
        return tokens[: self.max_length]


class SentenceTransformerEmbedder:
    """A sentence-transformers model directory (its own pooling and normalization modules); text inputs only."""

    def __init__(
        self,
        model_dir: Path,
        *,
        name: str,
        max_inputs: int = 2048,
        max_length: int | None = None,
        truncate: bool = True,
        normalize: bool = True,
        batch_size: int = 32,
    ) -> None:
        model_dir = Path(model_dir)
        if not (model_dir / "modules.json").is_file():
            raise EmbedModelError(f"{model_dir} is not a sentence-transformers model directory (no modules.json)")
        from sentence_transformers import SentenceTransformer

        model: Any = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
        if max_length is not None:
            model.max_seq_length = max_length
        self._model: Any = model
        self.name = name
        self.path = model_dir
        self.dimensions: int = int(model.get_sentence_embedding_dimension())
        self.max_length: int = int(model.max_seq_length)
        self.max_inputs = max_inputs
        self.truncate = truncate
        self.normalize = normalize
        self.batch_size = batch_size
        self._lock = threading.Lock()
        log.info("embedder %s loaded from %s (sentence-transformers, max_length %d)", name, model_dir, self.max_length)

    def embed(self, inputs: Sequence[str] | Sequence[Sequence[int]], *, truncate: bool | None = None) -> EmbedOutput:
        truncate = self.truncate if truncate is None else truncate
        if not inputs:
            raise EmbedInputError("input is empty; send a string or a list of strings")
        if len(inputs) > self.max_inputs:
            raise EmbedInputError(
                f"{len(inputs)} inputs is more than this embedder's limit of {self.max_inputs} per request; "
                "send fewer or raise embedder.max_inputs"
            )
        texts: list[str] = []
        for i, x in enumerate(inputs):
            if not isinstance(x, str):
                raise EmbedInputError("token-array input needs the llama.cpp embedder backend; send text")
            if not x:
                raise EmbedInputError(f"input[{i}] is an empty string")
            texts.append(x)
        with self._lock:
            if self._model is None:
                raise EmbedModelError(f"embedder {self.name} is closed")
            lengths = [len(ids) for ids in self._model.tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
            too_long = [i for i, n in enumerate(lengths) if n > self.max_length]
            if too_long and not truncate:
                i = too_long[0]
                raise EmbedTooLongError(
                    f"input[{i}] is {lengths[i]} tokens, more than this embedder's limit of {self.max_length}; "
                    "shorten it or allow truncation",
                    lengths[i],
                    self.max_length,
                )
            vectors = self._model.encode(
                texts,
                batch_size=self.batch_size,
                normalize_embeddings=self.normalize,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return EmbedOutput(vectors=vectors, prompt_tokens=sum(min(n, self.max_length) for n in lengths))

    def close(self) -> None:
        with self._lock:
            self._model = None


__all__ = [
    "EmbedBackend",
    "EmbedInputError",
    "EmbedModelError",
    "EmbedOutput",
    "EmbedTooLongError",
    "Embedder",
    "GGUFEmbedder",
    "SentenceTransformerEmbedder",
    "load_embedder",
]
