"""QLoRA across processes for real: `accelerate launch` with 2 CPU processes on gloo, a tiny random Llama in 4-bit
NF4 (bitsandbytes' CPU kernels) with LoRA, DDP.

- 1 process and 2 processes at the same global batch (8 = 2 per micro-batch x 1 process x 4 accumulated
  = 2 x 2 processes x 2) take the same steps: training and validation losses agree within 1e-4 at every step,
  and so do the adapters.
- a 2-process run killed with SIGKILL (the launcher and both workers) after its first checkpoint resumes from it
  and ends exactly where the uninterrupted 2-process run ends; each step is logged once.

Why 1e-4: both runs take the same micro-batches of 2 (so the same padding) in the same steps and differentiate the
same token-weighted loss; what differs is float32 arithmetic: the order in which the four micro-batch gradients are
added (4 in a row, or 2 per rank then the gloo all-reduce) and, for validation, how the rows are split between
ranks and padded. Here the runs differ by 2e-7 in the training loss and 1.2e-6 in the validation loss over 6 Adam
steps (printed by the test); 1e-4 is ~100 times that and 50 times smaller than how far the training loss falls in
those steps (asserted > 5e-3; 0.15 here), so a wrong shard, a doubled or missing example or a wrong loss scale
fails by orders of magnitude.

LoRA dropout is 0 here: with dropout, each process draws its own masks and the runs agree only statistically.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from edgellm.launch import free_port

REPO = Path(__file__).resolve().parents[1]
HAMMY = REPO / "train" / "data" / "hammy.jsonl"
TOLERANCE = 1e-4
STEPS = 6


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    """27 training and 9 validation conversations; a global batch of 8 (the fourth step runs into the second
    epoch), 6 steps, a checkpoint and a validation every 2."""
    tmp = tmp_path_factory.mktemp("distributed")
    data = tmp / "hammy-head.jsonl"
    data.write_text("\n".join(HAMMY.read_text(encoding="utf-8").splitlines()[:36]) + "\n", encoding="utf-8")
    recipe = {
        "name": "one",
        "base_model": str(tiny_llama),
        "output_dir": str(tmp / "runs"),
        "device": "cpu",
        "datasets": [{"name": "hammy", "path": str(data)}],
        "data": {"max_tokens": 160, "split": [0.75, 0.25, 0.0]},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {
            "batch_size": 2,
            "global_batch_size": 8,
            "lr": 5e-3,
            "warmup_steps": 0,
            "max_steps": STEPS,
            "eval_every": 2,
            "save_every": 2,
            "gradient_checkpointing": False,
        },
        "merge": {"enabled": False},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def launch(recipe: Path, name: str, processes: int) -> subprocess.Popen[bytes]:
    """`accelerate launch --multi_gpu --num_processes N -m edgellm train ...` as a user runs it (on a CPU box,
    `--multi_gpu` picks accelerate's torchrun launcher; the recipe joins the processes over gloo)."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        f"--num_processes={processes}",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={free_port()}",
        "-m",
        "edgellm",
        "train",
        "--config",
        str(recipe),
        "--set",
        f"name={name}",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",  # loopback only, whatever the host name resolves to
        "HF_HOME": str(recipe.parent / "hf-home"),  # no accelerate config from the user's home
    }
    with open(recipe.parent / f"{name}.log", "ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def kill_job(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the launcher and every process under it (torchrun starts each worker in a session of its own)."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(tree[1:], timeout=30)


def run_to_end(recipe: Path, name: str, processes: int, timeout: float = 300) -> Path:
    proc = launch(recipe, name, processes)
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_job(proc)
    log = (recipe.parent / f"{name}.log").read_text(errors="replace")
    assert code == 0, log[-4000:]
    assert log.count(f"run: {recipe.parent / 'runs' / name}") == 1, "one process reports the run"
    return recipe.parent / "runs" / name


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def curve(run: Path, key: str) -> dict[int, float]:
    rows = [m for m in metrics(run) if key in m]
    steps = [m["step"] for m in rows]
    assert len(steps) == len(set(steps)), f"{key}: a step logged twice in {run}: {steps}"
    return {m["step"]: m[key] for m in rows}


def adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def two_processes(recipe: Path) -> Path:
    return run_to_end(recipe, "two", 2)


def test_shards_cover_each_global_batch_once() -> None:
    from edgellm.train.qlora import _global_batches, shard

    stream = _global_batches(10, 4, seed=1, epoch=0, position=0)
    batches = [next(stream) for _ in range(5)]  # 20 examples: two epochs of 10, batches running across them
    assert [(b.epoch, b.position) for b in batches] == [(0, 4), (0, 8), (1, 2), (1, 6), (2, 0)]
    assert sorted(batches[0].indices + batches[1].indices + batches[2].indices[:2]) == list(range(10))
    resumed = _global_batches(10, 4, seed=1, epoch=batches[1].epoch, position=batches[1].position)
    assert [next(resumed).indices for _ in range(3)] == [b.indices for b in batches[2:]]
    for size in (1, 2, 4):
        mine = [shard(list(range(8)), r, size, batch_size=2) for r in range(size)]
        assert all(len(m) == 4 // size for m in mine)
        assert sorted(i for m in mine for micro in m for i in micro) == list(range(8))


def test_global_batch_size_must_cut_evenly() -> None:
    from edgellm.errors import ConfigError
    from edgellm.train.config import TrainingSettings

    t = TrainingSettings(batch_size=2, global_batch_size=8, max_steps=1)
    assert [t.accumulation(n) for n in (1, 2, 4)] == [4, 2, 1]
    assert t.global_batch(4) == 8
    with pytest.raises(ConfigError, match=r"training.global_batch_size: 8 .* on 3 processes"):
        t.accumulation(3)
    with pytest.raises(ValueError, match="set global_batch_size or grad_accum, not both"):
        TrainingSettings(global_batch_size=8, grad_accum=2, max_steps=1)
    assert TrainingSettings(batch_size=2, grad_accum=3, max_steps=1).global_batch(2) == 12


def test_one_and_two_processes_at_the_same_global_batch_agree(recipe: Path, two_processes: Path) -> None:
    import torch

    from edgellm.train.qlora import train

    [one] = train(recipe)
    for key in ("loss", "val_loss"):
        a, b = curve(one, key), curve(two_processes, key)
        assert a.keys() == b.keys() and len(a) == (STEPS if key == "loss" else STEPS // 2 + 1)
        gaps = {s: abs(a[s] - b[s]) for s in a}
        print(f"\n{key} (1 / 2 processes): " + " ".join(f"{s}:{a[s]:.7f}/{b[s]:.7f}" for s in a))
        print(f"{key}: largest gap {max(gaps.values()):.2e}")
        assert max(gaps.values()) < TOLERANCE, gaps
    train_loss = list(curve(one, "loss").values())
    # the curve moves far more than the gap allowed between the runs
    assert train_loss[0] - train_loss[-1] > 50 * TOLERANCE, train_loss
    x, y = adapter(one), adapter(two_processes)
    assert x.keys() == y.keys()
    for key in x:
        torch.testing.assert_close(x[key], y[key], rtol=1e-3, atol=1e-4)
    # the same examples, step by step: both runs cross into the second epoch at the same step
    assert [m.get("epoch") for m in metrics(one) if "loss" in m] == [
        m.get("epoch") for m in metrics(two_processes) if "loss" in m
    ]


def test_a_killed_two_process_run_resumes_identically(recipe: Path, two_processes: Path) -> None:
    """SIGKILL to the launcher and both workers after the first checkpoint; the relaunched run resumes there on
    both ranks and ends with the adapter, the metrics and the checkpoints of the uninterrupted run."""
    import psutil
    import torch

    name = "resumed"
    ckpts = recipe.parent / "runs" / name / "checkpoints"
    proc = launch(recipe, name, 2)
    try:
        deadline = time.monotonic() + 300
        while not list(ckpts.glob("step-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, (recipe.parent / f"{name}.log").read_text(errors="replace")[-4000:]
        workers = [
            w for w in psutil.Process(proc.pid).children(recursive=True) if "edgellm" in " ".join(w.cmdline())
        ]
    finally:
        kill_job(proc)
    assert len(workers) == 2 and not any(w.is_running() for w in workers)
    killed_at = int(sorted(p.name for p in ckpts.glob("step-*"))[-1].split("-")[1])
    assert 2 <= killed_at < STEPS

    ckpt = ckpts / f"step-{killed_at:07d}"
    saved = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)
    assert len(saved["rng"]) == 2  # rank 0 wrote every rank's random state
    assert json.loads((ckpt / "state.json").read_text())["processes"] == 2

    run = run_to_end(recipe, name, 2)
    log = (recipe.parent / f"{name}.log").read_text(errors="replace")
    assert log.count(f"resuming from {ckpt} (step {killed_at})") == 1, log[-4000:]
    assert list(curve(run, "loss")) == list(range(1, STEPS + 1))  # each step once: nothing redone or skipped
    for key in ("loss", "val_loss"):
        a, b = curve(run, key), curve(two_processes, key)
        assert a.keys() == b.keys()
        assert all(abs(a[s] - b[s]) < 1e-6 for s in a), (a, b)
    x, y = adapter(run), adapter(two_processes)
    for key in x:
        torch.testing.assert_close(x[key], y[key], rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000004", "step-0000006"]
