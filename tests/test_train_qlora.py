"""QLoRA for real on CPU: a tiny random Llama built here (and once the real base) in 4-bit NF4 with LoRA.

The loss goes down, a run killed with SIGKILL resumes at its checkpoint, and the merged 16-bit model loads with
transformers, has no quantization_config, differs from the base and matches the live adapter model.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from edgellm.errors import EdgeLLMError

REPO = Path(__file__).resolve().parents[1]
HAMMY = REPO / "train" / "data" / "hammy.jsonl"


@pytest.fixture(scope="module")
def base_dir() -> Path:
    from edgellm.catalog import pull

    return pull("base")


def _data(tmp: Path, n: int) -> Path:
    lines = HAMMY.read_text(encoding="utf-8").splitlines()[:n]
    path = tmp / "hammy-head.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _recipe(tmp: Path, base: Path, data: Path, **training: object) -> Path:
    recipe = {
        "name": "t",
        "base_model": str(base),
        "output_dir": str(tmp / "runs"),
        "datasets": [{"name": "hammy", "path": str(data)}],
        "data": {"max_tokens": 160, "split": [0.6, 0.4, 0.0]},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
        "training": {
            "batch_size": 4,
            "lr": 5e-3,
            "warmup_steps": 0,
            "max_steps": 8,
            "eval_every": 4,
            "save_every": 4,
        }
        | training,
        "merge": {"enabled": False},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    """One 8-step run on the tiny Llama (20 examples), trained once for the two tests that read it; the merge test
    only adds merged/ and merge_report.json beside what the first test checks."""
    from edgellm.train.qlora import train

    tmp = tmp_path_factory.mktemp("qlora")
    [run] = train(_recipe(tmp, tiny_llama, _data(tmp, 20)))
    assert run == tmp / "runs" / "t"
    return run


def test_qlora_steps_lower_the_loss_and_write_the_run(tiny_run: Path) -> None:
    run = tiny_run
    val = [m["val_loss"] for m in _metrics(run) if "val_loss" in m]
    assert len(val) == 3 and val[0] - val[1] > 0.05 and val[1] - val[2] > 0.01, val
    for name in (
        "adapter/adapter_model.safetensors",
        "config.yaml",
        "data/train.jsonl",
        "data/validation.jsonl",
    ):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000004", "step-0000008"]
    assert yaml.safe_load((run / "config.yaml").read_text())["training"]["max_steps"] == 8
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert {m.rsplit(".", 1)[-1] for m in adapter["target_modules"]} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_an_evaluation_does_not_break_4bit_training(tiny_llama: Path) -> None:
    """bitsandbytes repacks 4-bit CPU weights for inference after an eval-mode forward; training after that
    must see the same gradients as training before it (see train.modeling.keep_4bit_layers_trainable)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from edgellm.train.config import QuantSettings
    from edgellm.train.modeling import load_base

    ids = torch.tensor([[1, 504, 3458, 28, 940, 314, 253, 1978, 2]] * 2)

    def grads(evaluate_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = load_base(str(tiny_llama), "cpu", QuantSettings())
        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian")
        model = get_peft_model(model, lora)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before, after = grads(False), grads(True)
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], msg=name)


def test_merge_is_16_bit_unquantized_and_matches_the_adapter(tiny_run: Path, tiny_llama: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from edgellm.train.config import QuantSettings
    from edgellm.train.merge import merge_run
    from edgellm.train.modeling import load_live_adapter

    run = tiny_run
    ids = torch.tensor([[1, 504, 3458, 28, 940, 314, 253, 1978, 2]])

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids).logits.float()

    live = logits(load_live_adapter(str(tiny_llama), run / "adapter", "cpu", QuantSettings()))
    base = logits(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32))
    gap = (live - base).abs().max()
    assert gap > 1e-2  # training moved the model

    for kind, tolerance in (("dequantized", 0.02), ("original", 0.5)):
        [report] = merge_run(run, base=kind)
        assert set(report["kl_from_adapter_model"]) == {"original", "dequantized"}
        assert report["kl_from_adapter_model"]["dequantized"] < report["kl_from_adapter_model"]["original"]
        config = json.loads((run / "merged" / "config.json").read_text())
        assert "quantization_config" not in config and config["dtype"] == "float16"
        merged = AutoModelForCausalLM.from_pretrained(run / "merged")
        assert next(merged.parameters()).dtype == torch.float16
        assert not any("lora" in name for name, _ in merged.named_parameters())
        diff = (logits(merged.float()) - live).abs().max()
        assert diff < tolerance * gap, (kind, float(diff), float(gap))
    assert (run / "merge_report.json").is_file()


def test_merge_refuses_a_model_identical_to_its_base(tmp_path: Path, tiny_llama: Path) -> None:
    from edgellm.train.merge import merge_run
    from edgellm.train.qlora import train

    [run] = train(_recipe(tmp_path, tiny_llama, _data(tmp_path, 10), lr=1e-12, max_steps=1, save_every=1))
    with pytest.raises(EdgeLLMError, match="identical to its base"):
        merge_run(run)
    assert not (run / "merged").exists()


def test_a_killed_run_resumes_from_its_checkpoint(
    tmp_path: Path, tiny_llama: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL the training process after its first checkpoint; the rerun continues from that step, and ends
    with the same adapter as an uninterrupted run (data position, optimizer, scheduler and RNG restored)."""
    import torch
    from safetensors.torch import load_file

    from edgellm.train.qlora import train

    # 12 training examples in batches of 2: the run enters its second epoch after step 6, so the resumed run must
    # restore its place in the data and take the second epoch's order as the uninterrupted run does.
    data = _data(tmp_path, 20)
    recipe = _recipe(tmp_path, tiny_llama, data, max_steps=8, save_every=3, eval_every=4, batch_size=2)
    ckpts = tmp_path / "runs" / "t" / "checkpoints"
    code = f"from edgellm.train.qlora import train; train({str(recipe)!r})"
    with subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    ) as proc:  # closes the stderr pipe and waits
        try:
            deadline = time.monotonic() + 600
            while not list(ckpts.glob("step-*")) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
    done = sorted(p.name for p in ckpts.glob("step-*"))
    killed_at = int(done[-1].split("-")[1])
    assert 3 <= killed_at < 8

    with caplog.at_level(logging.INFO, logger="edgellm.train.qlora"):
        [run] = train(recipe)
    records = [r.getMessage() for r in caplog.records]
    assert any(f"(step {killed_at})" in m and "resuming from" in m for m in records), records
    steps = [m["step"] for m in _metrics(run) if "loss" in m]
    assert steps == list(range(1, 9))  # each step once: nothing redone, nothing skipped
    assert {m["epoch"] for m in _metrics(run) if "loss" in m} == {0, 1}  # steps in the first epoch and in the second

    fresh = yaml.safe_load(recipe.read_text()) | {"name": "fresh"}
    recipe.write_text(yaml.safe_dump(fresh))
    [again] = train(recipe)
    a = load_file(run / "adapter" / "adapter_model.safetensors")
    b = load_file(again / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_real_base_few_qlora_steps_lower_the_loss(tmp_path: Path, base_dir: Path) -> None:
    """Once on the real SmolLM2-135M base (4-bit NF4, double quantization): three steps lower validation loss."""
    from edgellm.train.qlora import train

    recipe = _recipe(
        tmp_path, base_dir, _data(tmp_path, 10), lr=2e-3, max_steps=3, eval_every=3, save_every=3
    )
    [run] = train(recipe)
    val = [m["val_loss"] for m in _metrics(run) if "val_loss" in m]
    assert len(val) == 2 and val[1] < val[0], val
