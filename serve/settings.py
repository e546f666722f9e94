"""Server settings: one validated YAML (configs/serve.yaml), every key overridable by CLI flag and by
``EDGELLM_SERVE__<KEY>`` environment variables (``__`` for nesting: ``EDGELLM_SERVE__MODELS__0__N_CTX=2048``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgellm.config import load_config
from edgellm.serve.engine.factory import EngineKind

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
    """A sentence-transformers CrossEncoder in a local directory."""

    name: str = Field("reranker", min_length=1)
    path: Path
    max_documents: int = Field(1000, ge=1)
    batch_size: int = Field(32, ge=1)
    max_length: int | None = Field(None, ge=8)
    truncate: bool = True
    threads: int | None = Field(
        1,
        ge=1,
        description="torch threads for reranking, set process-wide by the server when it loads the reranker "
        "(null: torch's default). torch and llama.cpp share one OpenMP runtime in this process: more OpenMP threads "
        "than cores makes it throttle, and chat decoding drops ~3x",
    )


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
    max_body_bytes: int = Field(1_000_000, ge=1024, description="largest request body accepted (413 beyond)")
    api_key: str | None = Field(None, description="if set, requests need 'Authorization: Bearer <key>'")
    cors_origins: list[str] = Field(default_factory=list, description="browser origins allowed (no credentials)")
    reranker: RerankerSettings | None = None
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
