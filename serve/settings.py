"""Server settings: one validated YAML (configs/serve.yaml), every key overridable by CLI flag and by
``EDGELLM_SERVE__<KEY>`` environment variables (``__`` for nesting: ``EDGELLM_SERVE__MODELS__0__N_CTX=2048``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgellm.config import load_config
from edgellm.serve.engine.embed import EmbedBackend
from edgellm.serve.engine.factory import EngineKind
from edgellm.serve.engine.rerank import RerankBackend, backend_for

ENV_PREFIX = "EDGELLM_SERVE"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(_Strict):
    """One GGUF model served under ``name``."""

    name: str = Field(min_length=1)
    path: Path
    n_ctx: int = Field(4096, ge=64, description="context size in tokens (shared by the engine's slots)")
    n_threads: int | None = Field(None, ge=1, description="generation threads; default: the physical cores")
    n_gpu_layers: int = Field(0, ge=-1, description="layers offloaded to a GPU build of llama.cpp (-1: all)")
    n_batch: int = Field(512, ge=1, description="prompt-processing chunk size")


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
    models: list[ModelSettings] = Field(min_length=1)
    max_tokens_cap: int = Field(2048, ge=1, description="upper bound on a request's max_tokens")
    default_max_tokens: int = Field(512, ge=1, description="max_tokens when a request gives none")
    max_n: int = Field(8, ge=1, le=64, description="largest `n` (choices per request) accepted")
    shutdown_timeout: float = Field(
        30.0, ge=0, description="on SIGTERM/SIGINT: seconds in-flight requests may run on before they are ended"
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
