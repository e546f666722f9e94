"""What an engine needs to know to load a model: flat, typed, independent of the settings file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgellm.hardware import default_threads


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path
    n_ctx: int = 4096
    n_threads: int | None = None
    n_gpu_layers: int = 0
    n_batch: int = 512
    chat_template: str | None = None  # Jinja source used instead of the GGUF's tokenizer.chat_template
    loras: tuple[Path, ...] = ()  # GGUF LoRA adapters loaded with the model; requests pick them by index

    def threads(self) -> int:
        """llama.cpp threads for this model: ``n_threads``, else ``edgellm.hardware.default_threads()`` (the
        physical cores this process may use)."""
        return self.n_threads or default_threads()
