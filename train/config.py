"""The QLoRA recipe's settings: one YAML (configs/train/*.yaml) that mirrors these models, validated by key."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgellm.config import load_config
from edgellm.errors import ConfigError
from edgellm.manifest import PersonaProfile

ENV_PREFIX = "EDGELLM_TRAIN"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EvalSettings(_Strict):
    """`edgellm train eval`: loss on the test split and a behaviour check on greedy answers, base vs merged.

    An answer passes when it meets every behaviour set here: it starts with ``expect_prefix``, ends with
    ``expect_suffix`` (a fixed closing line), is exactly ``numbered_steps`` numbered lines (``1. ...``, ``2. ...``)
    and finishes within ``max_words`` words."""

    prompts: Path | None = None
    use_test_split: bool = True
    expect_prefix: str | None = None
    expect_suffix: str | None = None
    numbered_steps: int | None = Field(default=None, gt=0)
    max_words: int | None = Field(default=None, gt=0)
    max_new_tokens: int = Field(default=96, gt=0)
    batch_size: int = Field(default=8, gt=0)


class PersonaSpec(PersonaProfile):
    """A dataset's ``persona:`` block: how its adapter is served as a persona (system prompt, limits, forbidden
    phrases, routing triggers and description). Kept in the run's config.yaml; `edgellm convert --lora` copies it
    into adapters.json, and `edgellm serve --personas <folder>` serves it."""

    model_config = ConfigDict(extra="forbid")


class DatasetSpec(_Strict):
    name: str = Field(
        pattern=r"^[A-Za-z0-9_.-]+$", description="adapter name; a folder under the run when several"
    )
    path: Path
    # This dataset's behaviour check (a persona's own prompts and behaviour): the keys set here replace the recipe's
    # `eval` keys for this adapter.
    eval: EvalSettings | None = None
    # How the adapter is served as a persona (travels to the adapter manifest); not part of training.
    persona: PersonaSpec | None = None


class DataSettings(_Strict):
    format: Literal["auto", "alpaca", "chat"] = "auto"
    max_tokens: int = Field(default=512, gt=8)
    on_invalid: Literal["skip", "fail"] = "skip"
    forbidden_phrases: list[str] = []
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    loss_on: Literal["assistant", "all"] = "assistant"

    @field_validator("split")
    @classmethod
    def _fractions(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(x < 0 for x in v) or abs(sum(v) - 1.0) > 1e-6 or v[0] <= 0:
            raise ValueError("train, validation and test fractions must be >= 0, train > 0, and sum to 1")
        return v


class QuantSettings(_Strict):
    load_in_4bit: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True


class LoraSettings(_Strict):
    r: int = Field(default=16, gt=0)
    alpha: float = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"


class TrainingSettings(_Strict):
    """One optimizer step sees ``batch_size x processes x grad_accum`` examples (the global batch).

    ``global_batch_size`` fixes that number instead of ``grad_accum``: each process then accumulates
    ``global_batch_size / (batch_size x processes)`` micro-batches, so one process and N processes under
    ``accelerate launch`` take the same steps on the same examples (see README, "Scaling out").
    """

    batch_size: int = Field(default=4, gt=0, description="examples per micro-batch, per process")
    grad_accum: int = Field(default=1, gt=0, description="micro-batches per process per optimizer step")
    global_batch_size: int | None = Field(
        default=None, gt=0, description="examples per optimizer step over all processes; derives grad_accum"
    )
    lr: float = Field(default=2e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    max_steps: int | None = Field(default=None, gt=0)
    epochs: float | None = Field(default=None, gt=0)
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = True
    eval_every: int = Field(default=50, gt=0)
    save_every: int = Field(default=50, gt=0)
    keep_checkpoints: int = Field(default=2, gt=0)
    log_every: int = Field(default=1, gt=0)
    optimizer: Literal["auto", "adamw", "paged_adamw"] = "auto"

    @model_validator(mode="after")
    def _length(self) -> TrainingSettings:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of max_steps and epochs")
        if self.global_batch_size is not None:
            if self.grad_accum != 1:
                raise ValueError("set global_batch_size or grad_accum, not both (grad_accum is derived)")
            if self.global_batch_size % self.batch_size:
                raise ValueError(
                    f"global_batch_size {self.global_batch_size} is not a multiple of batch_size {self.batch_size}"
                )
        return self

    def accumulation(self, processes: int) -> int:
        """Micro-batches each of ``processes`` processes runs per optimizer step."""
        if self.global_batch_size is None:
            return self.grad_accum
        per_round = self.batch_size * processes
        if self.global_batch_size % per_round:
            share, left = divmod(self.global_batch_size, processes)
            hint = (
                f"--set training.batch_size=<a divisor of {share}>"
                if not left
                else f"a global_batch_size that is a multiple of {processes}"
            )
            raise ConfigError(
                f"training.global_batch_size: {self.global_batch_size} examples cannot be cut into micro-batches of "
                f"batch_size {self.batch_size} on {processes} processes; use {hint}"
            )
        return self.global_batch_size // per_round

    def global_batch(self, processes: int) -> int:
        """Examples per optimizer step over all ``processes``."""
        return self.batch_size * processes * self.accumulation(processes)


class MergeSettings(_Strict):
    enabled: bool = True
    base: Literal["original", "dequantized"] = "original"
    dtype: Literal["bfloat16", "float16"] = "float16"
    compare_bases: bool = True


class TrainConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    base_model: str = "base"
    datasets: list[DatasetSpec] = Field(min_length=1)
    output_dir: Path = Path("runs")
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    resume: bool = True
    data: DataSettings = DataSettings()
    quantization: QuantSettings = QuantSettings()
    lora: LoraSettings = LoraSettings()
    training: TrainingSettings
    merge: MergeSettings = MergeSettings()
    eval: EvalSettings = EvalSettings()

    @field_validator("datasets")
    @classmethod
    def _unique(cls, v: list[DatasetSpec]) -> list[DatasetSpec]:
        names = [d.name for d in v]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be unique, got {names}")
        return v

    def run_dir(self) -> Path:
        out = Path(self.output_dir)
        return (out if out.is_absolute() else Path.cwd() / out) / self.name

    def eval_for(self, spec: DatasetSpec) -> EvalSettings:
        """The recipe's ``eval`` with the keys ``spec.eval`` sets replaced (what this dataset's adapter is checked by)."""
        if spec.eval is None:
            return self.eval
        return self.eval.model_copy(update={k: getattr(spec.eval, k) for k in spec.eval.model_fields_set})

    def adapter_dirs(self) -> dict[str, Path]:
        """Where each dataset's adapter run lives: the run folder itself, or one subfolder per dataset."""
        if len(self.datasets) == 1:
            return {self.datasets[0].name: self.run_dir()}
        return {d.name: self.run_dir() / d.name for d in self.datasets}


def load_train_config(path: Path | None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    return load_config(TrainConfig, path, overrides, env_prefix=ENV_PREFIX)
