"""Is the fine-tuned behaviour still there after quantization?

Runs the train stage's behaviour check (`edgellm.train.behaviour.behaviour_check`, the same check as `edgellm train
eval`) on every GGUF variant of a manifest, through llama.cpp and the chat template inside each file.

    behaviour_shares(Path("models/demo"), Path("runs/demo"))  # {"f16": {...}, "q4_k_m": {...}, "q8_0": {...}}
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from edgellm.convert.runner import GGUFRunner
from edgellm.fsutil import atomic_write_text
from edgellm.manifest import load_manifest
from edgellm.train.behaviour import behaviour_check

log = logging.getLogger(__name__)


def behaviour_shares(
    manifest_path: Path, run: Path, out: Path | None = None, max_prompts: int | None = None
) -> dict[str, dict[str, Any]]:
    """Pass shares per variant (the 16-bit reference first) on the run's held-out prompts; written to ``out``.

    ``max_prompts`` takes that many, alternating between the test split and the extra prompts file.
    """
    manifest = load_manifest(manifest_path)
    results: dict[str, dict[str, Any]] = {}
    for f in [manifest.reference, *(f for f in manifest.files if f.quant != manifest.reference.quant)]:
        with GGUFRunner(f.absolute_path, n_ctx=1024) as model:
            check = behaviour_check(run, model.chat, max_prompts)
        results[f.quant] = {"model": manifest.model_id(f), **check}
        log.info(
            "%s: behaviour pass share %.3f over %d held-out prompts",
            manifest.model_id(f),
            check["pass_share"],
            check["prompts"],
        )
    if out is not None:
        atomic_write_text(out, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return results
