"""Server settings: one validated YAML (configs/serve.yaml), every key overridable by CLI flag and by
``EDGELLM_SERVE__<KEY>`` environment variables (``__`` for nesting: ``EDGELLM_SERVE__MODELS__0__N_CTX=2048``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgellm.config import load_config
from edgellm.serve.engine.embed import EmbedBackend
from edgellm.serve.engine.factory import EngineKind
from edgellm.serve.engine.rerank import RerankBackend, backend_for

ENV_PREFIX = "EDGELLM_SERVE"

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(_Strict):
    """One GGUF model served under ``name``."""

    name: str = Field(min_length=1)
    path: Path
    n_ctx: int | None = Field(
        None, ge=64, description="context size per request in tokens; null: the model's trained context, halved "
        "until every slot's KV cache fits in the memory left after the weights (logged at start)"
    )
    n_threads: int | None = Field(None, ge=1, description="generation threads; default: the physical cores")
    n_gpu_layers: int = Field(0, ge=-1, description="layers offloaded to a GPU build of llama.cpp (-1: all)")
    n_batch: int = Field(512, ge=1, description="prompt-processing chunk size")
    chat_template: Path | None = Field(
        None, description="a Jinja chat template file used instead of the one in the GGUF (a model whose file "
        "carries none, or a wrong one)"
    )

    @field_validator("chat_template")
    @classmethod
    def _template_readable(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"chat template file {path} does not exist")
        return path


class ModelDefaults(_Strict):
    """What the models found in ``models_dir`` are served with (each file has no settings of its own)."""

    n_ctx: int | None = Field(
        None, ge=64, description="context size per request; null: sized to the memory left when the model loads"
    )
    n_threads: int | None = Field(None, ge=1, description="generation threads; default: the physical cores")
    n_gpu_layers: int = Field(0, ge=-1)
    n_batch: int = Field(512, ge=1)


class RerankerSettings(_Strict):
    """A cross-encoder for /v1/rerank: a GGUF made by `edgellm convert` (backend llama.cpp, no torch) or a
    sentence-transformers CrossEncoder directory (backend sentence-transformers)."""

    name: str = Field("reranker", min_length=1)
    path: Path
    backend: RerankBackend | None = Field(
        None, description="llama.cpp or sentence-transformers; null: llama.cpp for a .gguf file, else sentence-transformers"
    )
    max_documents: int = Field(1000, ge=1)
    batch_size: int = Field(32, ge=1, description="sentence-transformers: pairs per forward pass")
    n_batch: int = Field(512, ge=64, description="llama.cpp: tokens per llama_decode (many pairs in one)")
    max_length: int | None = Field(None, ge=8)
    truncate: bool = True
    max_waiting: int = Field(
        16, ge=0, description="requests allowed to wait while one is reranked; beyond it: 503 with Retry-After"
    )
    threads: int | None = Field(
        1,
        ge=1,
        description="threads for reranking: llama.cpp's for a GGUF; torch's for sentence-transformers, set process-wide "
        "by the server when it loads the reranker (null: torch's default). torch and llama.cpp share one OpenMP runtime "
        "in this process: more OpenMP threads than cores makes it throttle, and chat decoding drops ~3x",
    )

    @model_validator(mode="after")
    def _backend_fits_path(self) -> RerankerSettings:
        if self.backend == "llama.cpp" and self.path.suffix != ".gguf":
            raise ValueError(f"backend llama.cpp needs a .gguf file, got {self.path}")
        if self.backend == "sentence-transformers" and self.path.suffix == ".gguf":
            raise ValueError(f"backend sentence-transformers needs a model directory, got the GGUF {self.path}")
        return self

    def resolved_backend(self) -> RerankBackend:
        return self.backend or backend_for(self.path)


class EmbedderSettings(_Strict):
    """An embedding model for /v1/embeddings: a GGUF (backend llama.cpp, no torch; all-MiniLM-L6-v2 converted by
    `edgellm models pull embedder`) or a sentence-transformers directory (backend sentence-transformers)."""

    name: str = Field("embedder", min_length=1)
    path: Path
    backend: EmbedBackend | None = Field(
        None, description="llama.cpp or sentence-transformers; null: llama.cpp for a .gguf file, else sentence-transformers"
    )
    max_inputs: int = Field(2048, ge=1, description="inputs allowed in one request")
    max_length: int | None = Field(None, ge=8, description="tokens per input; null: the model's trained positions")
    truncate: bool = Field(True, description="cut longer inputs to max_length (false: 400 exceed_context_size_error)")
    normalize: bool = Field(True, description="L2-normalize the vectors (as sentence-transformers' Normalize)")
    pooling: Literal["mean", "cls", "last"] | None = Field(None, description="null: the pooling the GGUF records")
    n_batch: int = Field(512, ge=64, description="llama.cpp: tokens per llama_decode (many inputs in one)")
    batch_size: int = Field(32, ge=1, description="sentence-transformers: inputs per forward pass")
    max_waiting: int = Field(
        16, ge=0, description="requests allowed to wait while one is embedded; beyond it: 503 with Retry-After"
    )
    threads: int = Field(
        1,
        ge=1,
        description="llama.cpp threads (more than 1 starts a second OpenMP team beside chat decoding); torch's for "
        "sentence-transformers, set process-wide when it loads",
    )

    @model_validator(mode="after")
    def _backend_fits_path(self) -> EmbedderSettings:
        if self.backend == "llama.cpp" and self.path.suffix != ".gguf":
            raise ValueError(f"backend llama.cpp needs a .gguf file, got {self.path}")
        if self.backend == "sentence-transformers" and self.path.suffix == ".gguf":
            raise ValueError(f"backend sentence-transformers needs a model directory, got the GGUF {self.path}")
        return self

    def resolved_backend(self) -> EmbedBackend:
        return self.backend or ("llama.cpp" if self.path.suffix == ".gguf" else "sentence-transformers")


class ServeSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    engine: EngineKind = Field(
        "batched", description="batched: continuous batching (default); serial: one request at a time per model"
    )
    slots: int = Field(4, ge=1, le=64, description="batched engine: sequences decoded together per model")
    queue_size: int = Field(64, ge=0, description="requests allowed to wait per model; beyond it: 503")
    models: list[ModelSettings] = Field(
        default_factory=list, description="models loaded at start and kept loaded (may be empty with models_dir)"
    )
    models_dir: Path | None = Field(
        None, description="a folder whose GGUF files and convert manifests are served too, loaded on first request"
    )
    model_defaults: ModelDefaults = Field(default_factory=lambda: ModelDefaults.model_validate({}))
    max_loaded_models: int = Field(
        2, ge=1, description="models from models_dir loaded at once; loading one more unloads the least recently used"
    )
    keep_alive: float = Field(
        300.0, description="seconds a model from models_dir may stay idle before it is unloaded (negative: forever)"
    )
    load_timeout: float = Field(
        120.0, gt=0, description="seconds a request waits for its model to load; beyond it: 503 with Retry-After"
    )
    max_tokens_cap: int = Field(2048, ge=1, description="upper bound on a request's max_tokens")
    default_max_tokens: int = Field(512, ge=1, description="max_tokens when a request gives none")
    max_n: int = Field(8, ge=1, le=64, description="largest `n` (choices per request) accepted")
    shutdown_timeout: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="on SIGTERM/SIGINT: seconds in-flight requests may run on before they are ended (streams with a "
        "final chunk, finish_reason 'length'); give the container's stop grace period more than this",
    )
    max_body_bytes: int = Field(1_000_000, ge=1024, description="largest request body accepted (413 beyond)")
    api_key: str | None = Field(None, description="if set, requests need 'Authorization: Bearer <key>'")
    cors_origins: list[str] = Field(default_factory=list, description="browser origins allowed (no credentials)")
    reranker: RerankerSettings | None = None
    embedder: EmbedderSettings | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelSettings]) -> list[ModelSettings]:
        names = [m.name for m in models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dupes)}")
        return models

    @model_validator(mode="after")
    def _some_models(self) -> ServeSettings:
        if not self.models and self.models_dir is None:
            raise ValueError("no models: list some under `models` or serve a folder of them with `models_dir`")
        if self.models_dir is not None and not self.models_dir.is_dir():
            raise ValueError(f"models_dir {self.models_dir} is not a folder")
        return self

    @model_validator(mode="after")
    def _default_within_cap(self) -> ServeSettings:
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_cap ({self.max_tokens_cap})"
            )
        return self


def load_serve_settings(
    path: Path | None, overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None
) -> ServeSettings:
    return load_config(ServeSettings, path, overrides, env_prefix=ENV_PREFIX, environ=environ)


def models_from_paths(paths: list[Path], template: ModelSettings | None = None) -> list[dict[str, Any]]:
    """``--model PATH`` values: a GGUF file becomes a model named after the file; a convert manifest.json (or
    its folder) contributes every variant in it, named ``<name>:<quant>``."""
    base = template.model_dump(exclude={"name", "path"}) if template else {}
    out: list[dict[str, Any]] = []
    for p in paths:
        p = Path(p)
        if p.name.endswith(".json") or p.is_dir():
            from edgellm.manifest import load_manifest

            manifest = load_manifest(p)
            manifest.check_files()
            for f in manifest.files:
                out.append({**base, "name": manifest.model_id(f), "path": str(f.absolute_path)})
        else:
            out.append({**base, "name": p.stem, "path": str(p)})
    return out


# llama.cpp architectures that are encoders (embeddings, rerankers): no chat, no KV cache.
ENCODER_ARCHITECTURES = frozenset(
    {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "modern-bert", "neo-bert", "t5encoder"}
)


class ModelsDir:
    """The chat models in a folder (``models_dir``), rescanned on each ``scan()``: every GGUF file (named after the
    file) and every convert manifest.json (its variants, ``<name>:<quant>``; the GGUFs beside a manifest are not
    listed again). Encoder GGUFs (embedding and reranker models) and files not (yet) readable as GGUF are skipped.
    Headers are read once per file version (path, size, mtime)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._chat: dict[tuple[str, int, int], bool] = {}

    def _is_chat(self, path: Path) -> bool:
        from edgellm.gguf import read_header

        try:
            st = path.stat()
        except OSError:
            return False
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._chat:
            try:
                header = read_header(path, with_tensors=False)
            except Exception as e:  # a partial copy, or not a GGUF: seen again on the next scan
                log.debug("models_dir: skipping %s: %s", path, e)
                return False
            arch = header.architecture
            chat = bool(arch) and arch not in ENCODER_ARCHITECTURES and f"{arch}.pooling_type" not in header.meta
            if not chat:
                log.info("models_dir: %s is an encoder (%s), not a chat model: skipped", path, arch)
            self._chat[key] = chat
        return self._chat[key]

    def scan(self) -> list[tuple[str, Path]]:
        """(name, GGUF path) of every chat model in the folder, sorted by name; the first of a repeated name wins."""
        found: dict[str, Path] = {}
        manifest_dirs: set[Path] = set()
        for root, dirs, files in os.walk(self.folder, followlinks=True):
            dirs.sort()
            if "manifest.json" in files:
                manifest_dirs.add(Path(root))
                try:
                    for entry in models_from_paths([Path(root) / "manifest.json"]):
                        found.setdefault(entry["name"], Path(entry["path"]))
                except Exception as e:
                    log.warning("models_dir: skipping the manifest in %s: %s", root, e)
        for root, _dirs, files in os.walk(self.folder, followlinks=True):
            if Path(root) in manifest_dirs:
                continue
            for f in sorted(files):
                if f.endswith(".gguf"):
                    path = Path(root) / f
                    name = path.stem
                    if name in found and found[name] != path:
                        log.warning("models_dir: %s and %s are both named %r; serving the first", found[name], path,
                                    name)
                    found.setdefault(name, path)
        return sorted((n, p) for n, p in found.items() if self._is_chat(p))
