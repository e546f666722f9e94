"""The full Hammy demo, end to end through the CLI (slow: `make test-slow`).

`edgellm train --config configs/train/demo.yaml` then `edgellm train eval`: the merged model's greedy answers to
held-out prompts start with "Squeak!" and stay within 40 words far more often than the base's, and the test loss
drops.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_teaches_hammy(tmp_path: Path) -> None:
    from edgellm.catalog import pull

    pull("base")
    edgellm = [sys.executable, "-m", "edgellm"]
    started = time.monotonic()
    subprocess.run(
        [*edgellm, "train", "--config", "configs/train/demo.yaml", "--set", f"output_dir={tmp_path}"],
        cwd=REPO,
        check=True,
    )
    train_seconds = time.monotonic() - started
    run = tmp_path / "demo"
    merged = json.loads((run / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged
    subprocess.run([*edgellm, "train", "eval", str(run)], cwd=REPO, check=True)
    result = json.loads((run / "eval.json").read_text())
    base, tuned = result["models"]["base"], result["models"]["merged"]
    print(f"train+merge {train_seconds:.0f}s; base {base['pass_share']:.2f} -> merged {tuned['pass_share']:.2f}")
    assert base["pass_share"] <= 0.1
    assert tuned["pass_share"] >= 0.8
    assert tuned["pass_share_extra_prompts"] >= 0.7  # prompts unlike the training ones
    assert tuned["test_loss"] < base["test_loss"]
