"""Is the fine-tuned behaviour still there after quantization?

Runs the train stage's behaviour check (`edgellm.train.behaviour.behaviour_check`, the same check as `edgellm train
eval`) on every GGUF variant of a manifest, through llama.cpp and the chat template inside each file.

    behaviour_shares(Path("models/demo"), Path("runs/demo"))  # {"f16": {...}, "q4_k_m": {...}, "q8_0": {...}}
    adapter_behaviour_shares(Path("models/personas"))          # {"hammy": {...}, "pip": {...}, "olive": {...}}
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from edgellm.convert.runner import GGUFRunner
from edgellm.fsutil import atomic_write_text
from edgellm.manifest import load_adapter_manifest, load_manifest
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


def adapter_behaviour_shares(
    adapters_path: Path, out: Path | None = None, max_prompts: int | None = None, n_threads: int | None = None
) -> dict[str, dict[str, Any]]:
    """Pass shares of each LoRA adapter of ``adapters.json`` applied at run time on its base GGUF (what is served),
    with the behaviour check of the train run it came from; written to ``out``."""
    manifest = load_adapter_manifest(adapters_path)
    results: dict[str, dict[str, Any]] = {}
    for a in manifest.adapters:
        if a.run is None:
            log.warning("%s: no train run recorded; no behaviour check to run", a.name)
            continue
        lora = [(a.absolute_path, a.scale)]
        with GGUFRunner(manifest.base.absolute_path, n_ctx=1024, n_threads=n_threads, lora=lora) as model:
            check = behaviour_check(Path(a.run), model.chat, max_prompts)
        results[a.name] = {"base": manifest.base.file_name, "adapter": a.path, **check}
        log.info(
            "%s on %s: behaviour pass share %.3f over %d held-out prompts",
            a.name,
            manifest.base.file_name,
            check["pass_share"],
            check["prompts"],
        )
    if out is not None:
        atomic_write_text(out, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return results
