"""Is the fine-tuned behaviour still there after quantization?

Runs the train stage's behaviour check (`edgellm train eval`: held-out prompts, greedy answers, the share that start
with ``eval.expect_prefix`` and finish within ``eval.max_words``) on every GGUF variant of a manifest, through
llama.cpp and the chat template inside each file.

    behaviour_shares(Path("models/demo"), Path("runs/demo"))  # {"f16": {...}, "q4_k_m": {...}, "q8_0": {...}}
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any

from edgellm.manifest import load_manifest
from edgellm.convert.verify import load_llama
from edgellm.fsutil import atomic_write_text

log = logging.getLogger(__name__)


def behaviour_shares(
    manifest_path: Path, run: Path, out: Path | None = None, max_prompts: int | None = None
) -> dict[str, dict[str, Any]]:
    """Pass shares per variant (the 16-bit reference first) on the run's held-out prompts; written to ``out``.

    ``max_prompts`` takes that many, alternating between the test split and the extra prompts file.
    """
    from edgellm.train import data as D
    from edgellm.train.config import load_train_config
    from edgellm.train.evaluate import check_answer, held_out_prompts

    manifest = load_manifest(manifest_path)
    config = load_train_config(run / "config.yaml")
    prompts = held_out_prompts(config.eval, D.read_split(run / "data")["test"])
    if max_prompts is not None:
        by_set = [[p for p in prompts if p["set"] == s] for s in ("test", "extra")]
        mixed = [p for pair in itertools.zip_longest(*by_set) for p in pair if p is not None]
        prompts = mixed[:max_prompts]
    results: dict[str, dict[str, Any]] = {}
    for f in [manifest.reference, *(f for f in manifest.files if f.quant != manifest.reference.quant)]:
        llm = load_llama(f.absolute_path, n_ctx=1024, logits_all=False, n_threads=None)
        checks = []
        try:
            for p in prompts:
                llm.reset()
                r = llm.create_chat_completion(
                    messages=p["messages"], max_tokens=config.eval.max_new_tokens, temperature=0.0, seed=0
                )
                answer = (r["choices"][0]["message"]["content"] or "").strip()
                finished = r["choices"][0]["finish_reason"] == "stop"
                checks.append(
                    {"set": p["set"], "answer": answer, **check_answer(answer, finished, config.eval)}
                )
        finally:
            llm.close()
        share = sum(c["pass"] for c in checks) / max(len(checks), 1)
        results[f.quant] = {
            "model": manifest.model_id(f),
            "pass_share": share,
            "prefix_share": sum(c["prefix"] for c in checks) / max(len(checks), 1),
            "within_words_share": sum(c["within_words"] for c in checks) / max(len(checks), 1),
            "prompts": len(checks),
            "answers": checks,
        }
        log.info(
            "%s: behaviour pass share %.3f over %d held-out prompts", manifest.model_id(f), share, len(checks)
        )
    if out is not None:
        atomic_write_text(out, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return results
