"""`configs/convert*.yaml`: the arguments of `convert.recipe.convert_model`, validated (errors name key and line)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from edgellm.config import load_config
from edgellm.quants import DEFAULT_QUANTS, ftypes

ENV_PREFIX = "EDGELLM_CONVERT"


def _known_quant(name: str) -> str:
    """A llama.cpp quantization type name (``llama_ftype``, see `edgellm.quants`), lower-cased."""
    if name.lower() not in ftypes():
        raise ValueError(f"unknown quant type {name!r}; choose from {', '.join(ftypes())}")
    return name.lower()


Quant = Annotated[str, AfterValidator(_known_quant)]


class ConvertSettings(BaseModel):
    """Mirrors ``convert_model(src, out, quants, name, base_type, max_kl, threads, force, imatrix_text)``."""

    model_config = ConfigDict(extra="forbid")

    src: Path | None = Field(None, description="Hugging Face model directory (config.json + safetensors)")
    out: Path | None = Field(None, description="output folder (default: models/<source folder name>)")
    quants: list[Quant] = Field(list(DEFAULT_QUANTS), min_length=1)
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]+$", description="default: the output folder's name"
    )
    base_type: Literal["f16", "bf16"] = "f16"
    max_kl: float = Field(1e-3, gt=0, description="round-trip gate: mean KL(hf || 16-bit gguf)")
    threads: int | None = Field(None, gt=0)
    imatrix_text: Path | None = Field(None, description="calibration .txt/.jsonl for an importance matrix")
    force: bool = False


def load_convert_settings(path: Path | None, overrides: dict[str, Any] | None = None) -> ConvertSettings:
    return load_config(ConvertSettings, path, overrides, env_prefix=ENV_PREFIX)
