"""An importance matrix for llama.cpp's quantizer, from calibration text run through the Hugging Face model.

For every linear layer, the mean square of each input column over the calibration tokens (what llama.cpp's
``llama-imatrix`` tool measures), under the GGUF tensor name the converter gives that weight. The quantizer uses it
to spend precision on the columns that carry the most signal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edgellm.convert.llamacpp import ConvertError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Imatrix:
    values: dict[str, np.ndarray]  # GGUF tensor name -> float32 [in_features]
    n_tokens: int
    text_sha256: str


def read_calibration_text(path: Path) -> str:
    """A text file, or a .jsonl file whose string values are joined (e.g. a chat or instruction dataset)."""
    raw = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix != ".jsonl":
        return raw
    parts: list[str] = []

    def walk(v: object) -> None:
        if isinstance(v, str):
            parts.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    for lineno, line in enumerate(raw.splitlines(), start=1):
        if line.strip():
            try:
                walk(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConvertError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
    return "\n\n".join(parts)


def compute_imatrix(
    model_dir: Path, text: str, gguf_arch: str, max_tokens: int = 2048, window: int = 256
) -> Imatrix:
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}.get(gguf_arch)
    if arch is None:
        raise ConvertError(f"gguf-py does not know architecture {gguf_arch!r}; cannot name imatrix entries")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    n_blocks = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    names = gguf.get_tensor_name_map(arch, n_blocks)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < 16:
        raise ConvertError(f"calibration text has {len(ids)} tokens; give it at least a few hundred")

    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        gguf_name = names.get_name(f"{module_name}.weight", try_suffixes=(".weight",))
        if gguf_name is None:
            continue

        def hook(
            mod: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor, key: str = gguf_name
        ) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + (x * x).sum(dim=0)

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(ids), window), desc="imatrix", unit="window", file=sys.stderr):
                model(torch.tensor([ids[start : start + window]]))
    finally:
        for h in hooks:
            h.remove()
    values = {k: (v / len(ids)).float().numpy() for k, v in sums.items()}
    log.info("importance matrix: %d tensors from %d calibration tokens", len(values), len(ids))
    return Imatrix(values=values, n_tokens=len(ids), text_sha256=hashlib.sha256(text.encode()).hexdigest())
