"""`edgellm train --config configs/train/<name>.yaml`: QLoRA fine-tuning, top to bottom.

setup (run folder, resolved config) -> data (validate, split, tokenize) -> model (4-bit base + LoRA) ->
fit (evaluation, checkpoints, resume after a kill) -> save the adapter -> merge into a 16-bit model.

One recipe may name several datasets: each trains its own adapter on the same base, in ``runs/<name>/<dataset>/``
(a single dataset uses ``runs/<name>/`` itself).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

from tqdm import tqdm

from edgellm.config import dump_config
from edgellm.errors import EdgeLLMError
from edgellm.fsutil import atomic_path, atomic_write_text
from edgellm.paths import resolve_input
from edgellm.train import data as D
from edgellm.train.config import (
    DatasetSpec,
    LoraSettings,
    QuantSettings,
    TrainConfig,
    TrainingSettings,
    load_train_config,
)
from edgellm.train.modeling import (
    base_model_dir,
    collate,
    load_base,
    load_tokenizer,
    mean_loss,
    perplexity,
    pick_device,
)

log = logging.getLogger(__name__)


def train(config_path: Path | None, overrides: Mapping[str, Any] | None = None) -> list[Path]:
    """Run the recipe in ``config_path`` (with ``key.sub=value`` overrides); return each adapter's run folder."""
    return finetune(load_train_config(resolve_input(config_path) if config_path else None, overrides))


def finetune(config: TrainConfig) -> list[Path]:
    base_path = base_model_dir(config.base_model)
    device = pick_device(config.device)
    folders = []
    for spec, folder in zip(config.datasets, config.adapter_dirs().values(), strict=True):
        train_adapter(config, spec, folder, base_path, device)
        if config.merge.enabled:
            from edgellm.train.merge import merge_adapter

            merge_adapter(folder)
        folders.append(folder)
    return folders


def prepare_data(
    config: TrainConfig, spec: DatasetSpec, folder: Path, tokenizer: Any
) -> dict[str, list[D.Example]]:
    """Validate the dataset and split it, or reuse the split written when the run started."""
    path = resolve_input(spec.path)
    report = D.read_examples(
        path,
        fmt=config.data.format,
        max_tokens=config.data.max_tokens,
        count_tokens=D.token_counter(tokenizer),
        forbidden_phrases=config.data.forbidden_phrases,
    )
    log.info("%s: %s", path, report.summary())
    D.enforce(report, config.data.on_invalid)
    settings = config.data.model_dump(mode="json") | {"seed": config.seed}
    fingerprint = D.data_fingerprint([path], settings)
    split_dir = folder / "data"
    stamp = split_dir / "fingerprint.txt"
    if stamp.is_file():
        if stamp.read_text().strip() != fingerprint:
            raise EdgeLLMError(
                f"{path} or the data settings changed since {folder} started; "
                "pick a new recipe name or pass --set resume=false to start over"
            )
        log.info("reusing the data split in %s", split_dir)
        return D.read_split(split_dir)
    split = D.split_examples(report.examples, config.data.split, config.seed)
    D.write_split(split, split_dir, fingerprint)
    log.info("split %s: %s", split_dir, ", ".join(f"{k} {len(v)}" for k, v in split.items()))
    return split


def train_adapter(config: TrainConfig, spec: DatasetSpec, folder: Path, base_path: str, device: str) -> Path:
    """Train one adapter on ``spec`` in ``folder`` (resuming from its last checkpoint); return ``folder/adapter``."""
    t = config.training
    # --- setup: the run folder, its resolved config, the seeds ---------------------------------------------------
    prepare_folder(folder, config, spec)
    seed_all(config.seed)

    # --- data: validated, split (or the split the run started with), tokenized ---------------------------------
    tokenizer = load_tokenizer(base_path)
    split = prepare_data(config, spec, folder, tokenizer)
    train_rows = encode_examples(tokenizer, split["train"], config.data.loss_on)
    val_rows = encode_examples(tokenizer, split["validation"], config.data.loss_on)
    total_steps = count_steps(len(train_rows), t)

    # --- model: the (4-bit) base with LoRA, its optimizer and schedule ------------------------------------------
    model = lora_model(base_path, device, config.quantization, config.lora, t.gradient_checkpointing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    log.info(
        "LoRA: %.2fM trainable parameters on %s (%s)",
        sum(p.numel() for p in trainable) / 1e6,
        device,
        base_path,
    )
    optimizer = _optimizer(t.optimizer, trainable, t.lr, t.weight_decay, device)
    scheduler = _scheduler(optimizer, t.schedule, t.warmup_steps, total_steps, t.min_lr_ratio)

    # --- resume from the last checkpoint, or measure the starting point ------------------------------------------
    state = resume_or_start(
        folder, model, optimizer, scheduler, config.resume, val_rows, tokenizer.pad_token_id, device
    )

    # --- fit: steps, evaluation on the validation split, checkpoints ----------------------------------------------
    fit(
        model,
        optimizer,
        scheduler,
        trainable,
        train_rows,
        val_rows,
        pad_id=tokenizer.pad_token_id,
        device=device,
        training=t,
        state=state,
        total_steps=total_steps,
        folder=folder,
        seed=config.seed,
        desc=f"train {spec.name}",
    )

    # --- save the adapter ------------------------------------------------------------------------------------
    return save_adapter(model, tokenizer, folder)


def prepare_folder(folder: Path, config: TrainConfig, spec: DatasetSpec) -> None:
    """Start over (``resume: false``) or check that a run being resumed is the same recipe; write its config."""
    if not config.resume and folder.exists():
        log.info("resume: false; removing %s", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _check_same_recipe(folder / "config.yaml", config)
    resolved = config.model_copy(update={"datasets": [spec]})
    atomic_write_text(folder / "config.yaml", dump_config(resolved))


def seed_all(seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    random.seed(seed)


def encode_examples(
    tokenizer: Any, examples: list[D.Example], loss_on: Literal["assistant", "all"]
) -> list[dict[str, list[int]]]:
    return [D.encode(tokenizer, ex.as_messages(), loss_on) for ex in examples]


def count_steps(n_rows: int, training: TrainingSettings) -> int:
    """Optimizer steps: ``max_steps``, or ``epochs`` over ``n_rows`` in micro-batches of ``batch_size`` with
    ``grad_accum`` micro-batches per step."""
    micro_per_epoch = math.ceil(n_rows / training.batch_size)
    return training.max_steps or math.ceil((training.epochs or 1) * micro_per_epoch / training.grad_accum)


def lora_model(
    base_path: str, device: str, quant: QuantSettings, lora: LoraSettings, gradient_checkpointing: bool
) -> Any:
    """The base (4-bit when ``quant`` says so, prepared for k-bit training) with fresh LoRA layers."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = load_base(base_path, device, quant)
    model.config.use_cache = False
    if quant.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft types it int; a float scales the same way
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def resume_or_start(
    folder: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    resume: bool,
    val_rows: list[dict[str, list[int]]],
    pad_id: int,
    device: str,
) -> dict[str, int]:
    """The loop's position: restored from the latest checkpoint (metrics logged after it are dropped), or step 0
    with the validation loss before training logged."""
    last = latest_checkpoint(folder / "checkpoints") if resume else None
    metrics_path = folder / "metrics.jsonl"
    if last is not None:
        state = load_checkpoint(last, model, optimizer, scheduler)
        log.info("resuming from %s (step %d)", last, state["step"])
        _truncate_metrics(metrics_path, state["step"])
        return state
    metrics_path.unlink(missing_ok=True)
    if val_rows:
        loss = mean_loss(model, val_rows, pad_id, device)
        _log_metrics(metrics_path, {"step": 0, "val_loss": loss, "val_ppl": perplexity(loss)})
        log.info("step 0: validation loss %.4f (perplexity %.2f)", loss, perplexity(loss))
    return {"step": 0, "epoch": 0, "micro": 0, "tokens": 0}


def fit(
    model: Any,
    optimizer: Any,
    scheduler: Any,
    trainable: list[Any],
    train_rows: list[dict[str, list[int]]],
    val_rows: list[dict[str, list[int]]],
    *,
    pad_id: int,
    device: str,
    training: TrainingSettings,
    state: dict[str, int],
    total_steps: int,
    folder: Path,
    seed: int,
    desc: str,
) -> None:
    """Optimizer steps from ``state["step"]`` to ``total_steps``: metrics to ``folder/metrics.jsonl``, validation
    every ``eval_every`` steps, checkpoints every ``save_every`` (and at the end). Updates ``state``."""
    t = training
    metrics_path = folder / "metrics.jsonl"
    model.train()
    stream = _micro_batches(len(train_rows), t.batch_size, seed, state["epoch"], state["micro"])
    bar = tqdm(total=total_steps, initial=state["step"], desc=desc, unit="step", file=sys.stderr)
    while state["step"] < total_steps:
        started = time.perf_counter()
        done = train_step(model, optimizer, scheduler, trainable, stream, train_rows, pad_id, device, t, state)
        step = state["step"]
        tok_s = done.tokens / (time.perf_counter() - started)
        bar.update(1)
        bar.set_postfix(loss=f"{done.loss:.4f}", tok_s=f"{tok_s:.0f}")
        if step % t.log_every == 0 or step == total_steps:
            _log_metrics(
                metrics_path,
                {"step": step, "loss": done.loss, "lr": done.lr, "tokens_per_s": tok_s, "epoch": done.epoch},
            )
        if val_rows and (step % t.eval_every == 0 or step == total_steps):
            val = mean_loss(model, val_rows, pad_id, device)
            _log_metrics(metrics_path, {"step": step, "val_loss": val, "val_ppl": perplexity(val)})
            bar.write(
                f"step {step}: validation loss {val:.4f} (perplexity {perplexity(val):.2f})", file=sys.stderr
            )
        if step % t.save_every == 0 or step == total_steps:
            save_checkpoint(folder / "checkpoints", model, optimizer, scheduler, state, t.keep_checkpoints)
    bar.close()


class StepResult(NamedTuple):
    loss: float  # summed over the step's micro-batches (each divided by grad_accum)
    tokens: int
    epoch: int  # of the step's last micro-batch
    lr: float  # the learning rate the step used


def train_step(
    model: Any,
    optimizer: Any,
    scheduler: Any,
    trainable: list[Any],
    stream: Iterator[tuple[int, int, list[int]]],
    train_rows: list[dict[str, list[int]]],
    pad_id: int,
    device: str,
    training: TrainingSettings,
    state: dict[str, int],
) -> StepResult:
    """One optimizer step over ``grad_accum`` micro-batches; advances ``state`` (step, tokens, data position)."""
    import torch

    step_loss, step_tokens, epoch = 0.0, 0, state["epoch"]
    for _ in range(training.grad_accum):
        epoch, micro, idx = next(stream)
        batch = collate([train_rows[i] for i in idx], pad_id, device)
        loss = model(**batch).loss / training.grad_accum
        loss.backward()
        step_loss += loss.item()
        step_tokens += int(batch["attention_mask"].sum())
        state["epoch"], state["micro"] = epoch, micro
    if training.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(trainable, training.max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state["step"] += 1
    state["tokens"] += step_tokens
    return StepResult(loss=step_loss, tokens=step_tokens, epoch=epoch, lr=lr)


def save_adapter(model: Any, tokenizer: Any, folder: Path) -> Path:
    with atomic_path(folder / "adapter") as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(tmp)
    log.info("adapter saved in %s", folder / "adapter")
    return folder / "adapter"


# --- the loop's parts -------------------------------------------------------------------------------------


def _optimizer(kind: str, params: list[Any], lr: float, weight_decay: float, device: str) -> Any:
    import torch

    if kind == "auto":
        kind = "paged_adamw" if device == "cuda" else "adamw"
    if kind == "paged_adamw":
        if device != "cuda":
            raise EdgeLLMError("training.optimizer: paged_adamw needs a CUDA device; use adamw on CPU")
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _scheduler(optimizer: Any, kind: str, warmup: int, total: int, floor: float) -> Any:
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(kind, warmup, total, floor))


def _schedule(kind: str, warmup: int, total: int, floor: float) -> Any:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
        return floor + (1 - floor) * shape

    return factor


def _micro_batches(
    n: int, size: int, seed: int, epoch: int, start: int
) -> Iterator[tuple[int, int, list[int]]]:
    """Yield ``(epoch, position after this batch, indices)`` forever; each epoch has its own seeded order, so a
    resumed run sees exactly the batches it would have seen."""
    while True:
        order = list(range(n))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        chunks = [order[i : i + size] for i in range(0, n, size)]
        for j in range(start, len(chunks)):
            if j + 1 == len(chunks):
                yield epoch + 1, 0, chunks[j]
            else:
                yield epoch, j + 1, chunks[j]
        epoch, start = epoch + 1, 0


def _log_metrics(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (and a line cut short by a kill)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


_IDENTITY_KEYS = ("base_model", "seed", "data", "quantization", "lora")


def _check_same_recipe(saved: Path, config: TrainConfig) -> None:
    """Resuming a run with a different base, data or LoRA shape would silently mix two experiments."""
    if not saved.is_file() or not config.resume:
        return
    import yaml

    old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    new = config.model_dump(mode="json")
    changed = [k for k in _IDENTITY_KEYS if k in old and old[k] != new[k]]
    for k in ("batch_size", "grad_accum"):
        if old.get("training", {}).get(k) not in (None, new["training"][k]):
            changed.append(f"training.{k}")
    if changed:
        raise EdgeLLMError(
            f"{saved.parent} was started with different {', '.join(changed)}; "
            "pick a new recipe name or pass --set resume=false to start over"
        )


# --- checkpoints ------------------------------------------------------------------------------------------


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir() and (p / "state.json").is_file())
    return found[-1] if found else None


def save_checkpoint(
    ckpt_dir: Path, model: Any, optimizer: Any, scheduler: Any, state: dict[str, int], keep: int
) -> Path:
    """Adapter weights, optimizer, scheduler, RNG and data position, written atomically (a kill mid-write leaves
    the previous checkpoint as the latest)."""
    import torch

    final = ckpt_dir / f"step-{state['step']:07d}"
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
            tmp / "trainer.pt",
        )
        (tmp / "state.json").write_text(json.dumps(state))
    for old in sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: Path, model: Any, optimizer: Any, scheduler: Any) -> dict[str, int]:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
    saved = torch.load(folder / "trainer.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["torch"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return dict(json.loads((folder / "state.json").read_text()))
