"""`edgellm train --config configs/train/<name>.yaml`: QLoRA fine-tuning, top to bottom.

setup (run folder, resolved config) -> data (validate, split, tokenize) -> model (4-bit base + LoRA) ->
fit (evaluation, checkpoints, resume after a kill) -> save the adapter -> merge into a 16-bit model.

One recipe may name several datasets: each trains its own adapter on the same base, in ``runs/<name>/<dataset>/``
(a single dataset uses ``runs/<name>/`` itself).

The same recipe runs on N processes under ``accelerate launch`` (DDP; gloo on CPU, NCCL on GPUs). A step takes
the next ``global batch`` examples of one seeded order over the whole training split, whatever the number of
processes; each process trains on its share and the loss is summed over tokens and divided by the step's token
count, so the gradient does not depend on how the step is cut into processes and micro-batches. Rank 0 alone
writes the run folder, the metrics and the checkpoints (with every rank's random state); all ranks resume from
the same checkpoint.
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
    Processes,
    base_model_dir,
    collate,
    is_cuda,
    join_processes,
    load_base,
    load_tokenizer,
    loss_totals,
    perplexity,
    pick_device,
    summed_loss,
    target_count,
)

log = logging.getLogger(__name__)


def train(config_path: Path | None, overrides: Mapping[str, Any] | None = None) -> list[Path]:
    """Run the recipe in ``config_path`` (with ``key.sub=value`` overrides); return each adapter's run folder."""
    return finetune(load_train_config(resolve_input(config_path) if config_path else None, overrides))


def finetune(config: TrainConfig) -> list[Path]:
    base_path = base_model_dir(config.base_model)
    procs = join_processes(config.device)
    folders = []
    try:
        for spec, folder in zip(config.datasets, config.adapter_dirs().values(), strict=True):
            train_adapter(config, spec, folder, base_path, procs)
            if config.merge.enabled and procs.is_main:
                from edgellm.train.merge import merge_adapter

                merge_adapter(folder)
            folders.append(folder)
    finally:
        procs.close()
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


def train_adapter(
    config: TrainConfig, spec: DatasetSpec, folder: Path, base_path: str, procs: Processes | None = None
) -> Path:
    """Train one adapter on ``spec`` in ``folder`` (resuming from its last checkpoint); return ``folder/adapter``.

    ``procs``: the processes training together (default: this one alone, on the recipe's device)."""
    t = config.training
    procs = procs or Processes(device=pick_device(config.device))
    global_batch = t.global_batch(procs.size)
    # --- setup: the run folder, its resolved config, the seeds (rank 0 writes, the others wait) ------------------
    if procs.is_main:
        prepare_folder(folder, config, spec)
    procs.barrier()
    seed_all(config.seed)

    # --- data: validated, split (or the split the run started with), tokenized ---------------------------------
    tokenizer = load_tokenizer(base_path)
    split = prepare_data(config, spec, folder, tokenizer) if procs.is_main else None
    procs.barrier()
    if split is None:  # the other ranks read the split rank 0 wrote
        split = D.read_split(folder / "data")
    train_rows = encode_examples(tokenizer, split["train"], config.data.loss_on)
    val_rows = encode_examples(tokenizer, split["validation"], config.data.loss_on)
    total_steps = count_steps(len(train_rows), t, procs.size)

    # --- model: the (4-bit) base with LoRA, its optimizer and schedule ------------------------------------------
    model = lora_model(base_path, procs.device, config.quantization, config.lora, t.gradient_checkpointing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    (log.info if procs.is_main else log.debug)(
        "LoRA: %.2fM trainable parameters on %s (%s); global batch %d = %d per micro-batch x %d processes x %d "
        "accumulated",
        sum(p.numel() for p in trainable) / 1e6,
        procs.device,
        base_path,
        global_batch,
        t.batch_size,
        procs.size,
        t.accumulation(procs.size),
    )
    optimizer = _optimizer(t.optimizer, trainable, t.lr, t.weight_decay, procs.device)
    scheduler = _scheduler(optimizer, t.schedule, t.warmup_steps, total_steps, t.min_lr_ratio)

    # --- resume from the last checkpoint, or measure the starting point ------------------------------------------
    state = resume_or_start(
        folder,
        model,
        optimizer,
        scheduler,
        config.resume,
        val_rows,
        tokenizer.pad_token_id,
        procs,
        global_batch,
    )
    torch_seed_for_rank(config.seed, procs, resumed=state["step"] > 0)

    # --- fit: steps, evaluation on the validation split, checkpoints ----------------------------------------------
    fit(
        model,
        optimizer,
        scheduler,
        trainable,
        train_rows,
        val_rows,
        pad_id=tokenizer.pad_token_id,
        procs=procs,
        training=t,
        state=state,
        total_steps=total_steps,
        folder=folder,
        seed=config.seed,
        desc=f"train {spec.name}",
    )

    # --- save the adapter (rank 0) ------------------------------------------------------------------------------
    if procs.is_main:
        save_adapter(model, tokenizer, folder)
    procs.barrier()
    return folder / "adapter"


def prepare_folder(folder: Path, config: TrainConfig, spec: DatasetSpec) -> None:
    """Start over (``resume: false``) or check that a run being resumed is the same recipe; write its config."""
    if not config.resume and folder.exists():
        log.info("resume: false; removing %s", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _check_same_recipe(folder / "config.yaml", config)
    # One dataset, and the behaviour check its adapter is held to at the top (its own `eval` keys applied).
    resolved = config.model_copy(
        update={"datasets": [spec.model_copy(update={"eval": None})], "eval": config.eval_for(spec)}
    )
    atomic_write_text(folder / "config.yaml", dump_config(resolved))


def seed_all(seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    random.seed(seed)


def torch_seed_for_rank(seed: int, procs: Processes, resumed: bool) -> None:
    """After the model is built (the same LoRA initialisation everywhere), each rank draws its own dropout masks.
    A resumed run keeps the random state its checkpoint restored."""
    if resumed:
        return
    import torch

    torch.manual_seed(seed + 1_000_003 * procs.rank)


def encode_examples(
    tokenizer: Any, examples: list[D.Example], loss_on: Literal["assistant", "all"]
) -> list[dict[str, list[int]]]:
    return [D.encode(tokenizer, ex.as_messages(), loss_on) for ex in examples]


def count_steps(n_rows: int, training: TrainingSettings, processes: int = 1) -> int:
    """Optimizer steps: ``max_steps``, or ``epochs`` over ``n_rows`` examples taken a global batch at a time."""
    return training.max_steps or math.ceil((training.epochs or 1) * n_rows / training.global_batch(processes))


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
    procs: Processes,
    global_batch: int,
) -> dict[str, int]:
    """The loop's position: restored from the latest checkpoint (metrics logged after it are dropped), or step 0
    with the validation loss before training logged. Every rank reads the same checkpoint."""
    last = latest_checkpoint(folder / "checkpoints") if resume else None
    metrics_path = folder / "metrics.jsonl"
    if last is not None:
        state = load_checkpoint(last, model, optimizer, scheduler, procs, global_batch)
        if procs.is_main:
            log.info("resuming from %s (step %d)", last, state["step"])
            _truncate_metrics(metrics_path, state["step"])
        procs.barrier()
        return state
    if procs.is_main:
        metrics_path.unlink(missing_ok=True)
    if val_rows:
        loss = validation_loss(model, val_rows, pad_id, procs)
        if procs.is_main:
            _log_metrics(metrics_path, {"step": 0, "val_loss": loss, "val_ppl": perplexity(loss)})
            log.info("step 0: validation loss %.4f (perplexity %.2f)", loss, perplexity(loss))
    return {"step": 0, "epoch": 0, "position": 0, "tokens": 0}


def validation_loss(model: Any, val_rows: list[dict[str, list[int]]], pad_id: int, procs: Processes) -> float:
    """Mean loss per labelled token over the validation split, each process scoring its share."""
    total, count = procs.sum(loss_totals(model, val_rows[procs.rank :: procs.size], pad_id, procs.device))
    return total / max(count, 1)


def fit(
    model: Any,
    optimizer: Any,
    scheduler: Any,
    trainable: list[Any],
    train_rows: list[dict[str, list[int]]],
    val_rows: list[dict[str, list[int]]],
    *,
    pad_id: int,
    procs: Processes,
    training: TrainingSettings,
    state: dict[str, int],
    total_steps: int,
    folder: Path,
    seed: int,
    desc: str,
) -> None:
    """Optimizer steps from ``state["step"]`` to ``total_steps``: metrics to ``folder/metrics.jsonl`` (rank 0),
    validation every ``eval_every`` steps, checkpoints every ``save_every`` (and at the end). Updates ``state``."""
    t = training
    metrics_path = folder / "metrics.jsonl"
    ddp = procs.wrap(model)
    ddp.train()
    targets = [target_count(row) for row in train_rows]
    global_batch = t.global_batch(procs.size)
    stream = _global_batches(len(train_rows), global_batch, seed, state["epoch"], state["position"])
    bar = tqdm(
        total=total_steps,
        initial=state["step"],
        desc=desc,
        unit="step",
        file=sys.stderr,
        disable=not procs.is_main,
    )
    while state["step"] < total_steps:
        started = time.perf_counter()
        done = train_step(
            ddp, optimizer, scheduler, trainable, next(stream), train_rows, targets, pad_id, procs, t, state
        )
        step = state["step"]
        tok_s = done.tokens / (time.perf_counter() - started)
        bar.update(1)
        bar.set_postfix(loss=f"{done.loss:.4f}", tok_s=f"{tok_s:.0f}")
        if procs.is_main and (step % t.log_every == 0 or step == total_steps):
            _log_metrics(
                metrics_path,
                {"step": step, "loss": done.loss, "lr": done.lr, "tokens_per_s": tok_s, "epoch": done.epoch},
            )
        if val_rows and (step % t.eval_every == 0 or step == total_steps):
            val = validation_loss(model, val_rows, pad_id, procs)
            if procs.is_main:
                _log_metrics(metrics_path, {"step": step, "val_loss": val, "val_ppl": perplexity(val)})
                bar.write(
                    f"step {step}: validation loss {val:.4f} (perplexity {perplexity(val):.2f})",
                    file=sys.stderr,
                )
        if step % t.save_every == 0 or step == total_steps:
            save_checkpoint(
                folder / "checkpoints",
                model,
                optimizer,
                scheduler,
                state,
                t.keep_checkpoints,
                procs,
                global_batch,
            )
    bar.close()


class StepResult(NamedTuple):
    loss: float  # mean per labelled token over the whole step (all processes)
    tokens: int  # over all processes
    epoch: int  # the epoch the next step starts in
    lr: float  # the learning rate the step used


class GlobalBatch(NamedTuple):
    indices: list[int]  # the step's examples, in the run's one order, for all processes together
    epoch: int  # where the next step starts
    position: int


def train_step(
    model: Any,
    optimizer: Any,
    scheduler: Any,
    trainable: list[Any],
    batch: GlobalBatch,
    train_rows: list[dict[str, list[int]]],
    targets: list[int],
    pad_id: int,
    procs: Processes,
    training: TrainingSettings,
    state: dict[str, int],
) -> StepResult:
    """One optimizer step on ``batch``: this process's micro-batches of it, gradients of the loss summed over
    tokens and divided by the labelled tokens of the whole global batch (DDP averages over processes, hence the
    ``procs.size`` factor); advances ``state`` (step, tokens, data position)."""
    import torch

    mine = shard(batch.indices, procs.rank, procs.size, training.batch_size)
    scale = procs.size / max(1, sum(targets[i] for i in batch.indices))
    step_loss, step_tokens = 0.0, 0
    for k, idx in enumerate(mine):
        micro = collate([train_rows[i] for i in idx], pad_id, procs.device)
        with procs.no_sync(model, sync=k == len(mine) - 1):
            loss = summed_loss(model, micro)
            (loss * scale).backward()
        step_loss += loss.item()
        step_tokens += int(micro["attention_mask"].sum())
    step_loss, tokens = procs.sum([step_loss * scale / procs.size, step_tokens])
    if training.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(trainable, training.max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state["step"] += 1
    state["tokens"] += int(tokens)
    state["epoch"], state["position"] = batch.epoch, batch.position
    return StepResult(loss=step_loss, tokens=int(tokens), epoch=batch.epoch, lr=lr)


def shard(indices: list[int], rank: int, size: int, batch_size: int) -> list[list[int]]:
    """This rank's micro-batches of a global batch: micro-batch ``k`` of rank ``r`` is the ``k * size + r``-th
    slice of ``batch_size`` examples (every rank gets the same number; their union is the global batch)."""
    chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    return chunks[rank::size]


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
        kind = "paged_adamw" if is_cuda(device) else "adamw"
    if kind == "paged_adamw":
        if not is_cuda(device):
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


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def _global_batches(n: int, size: int, seed: int, epoch: int, position: int) -> Iterator[GlobalBatch]:
    """The next ``size`` examples of the run's one order, forever, with where the following batch starts. Each
    epoch has its own seeded order and a batch runs on into the next epoch, so every step has the same number of
    examples and a resumed run (on any number of processes) sees exactly the batches it would have seen."""
    order = epoch_order(n, seed, epoch)
    while True:
        indices: list[int] = []
        while len(indices) < size:
            take = order[position : position + size - len(indices)]
            indices += take
            position += len(take)
            if position == n:
                epoch, position = epoch + 1, 0
                order = epoch_order(n, seed, epoch)
        yield GlobalBatch(indices, epoch, position)


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
    for k in ("batch_size", "grad_accum", "global_batch_size"):
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
    ckpt_dir: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    state: dict[str, int],
    keep: int,
    procs: Processes | None = None,
    global_batch: int | None = None,
) -> Path:
    """Adapter weights, optimizer, scheduler, every rank's RNG and the data position, written atomically by rank 0
    (a kill mid-write leaves the previous checkpoint as the latest). The adapter and optimizer are the same on every
    rank (DDP); only the random states differ, and they are gathered."""
    import torch

    procs = procs or Processes()
    final = ckpt_dir / f"step-{state['step']:07d}"
    rngs = procs.gather(_rng_state(procs.device))
    if procs.is_main:
        with atomic_path(final) as tmp:
            tmp.mkdir(parents=True)
            model.save_pretrained(tmp)
            torch.save(
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rngs},
                tmp / "trainer.pt",
            )
            meta = {"processes": procs.size, "global_batch": global_batch}
            (tmp / "state.json").write_text(json.dumps(state | meta))
        for old in sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    folder: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    procs: Processes | None = None,
    global_batch: int | None = None,
) -> dict[str, int]:
    """Restore a checkpoint on this rank. The global batch must be the one the run started with; the number of
    processes may differ (the data position is global), but then dropout draws new masks."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    procs = procs or Processes()
    state = dict(json.loads((folder / "state.json").read_text()))
    if "position" not in state:
        raise EdgeLLMError(
            f"{folder} was written by an earlier edgellm (data position in micro-batches); "
            "pass --set resume=false to start over"
        )
    saved_procs = int(state.pop("processes", 1))
    saved_global = state.pop("global_batch", None)
    if saved_global is not None and global_batch is not None and saved_global != global_batch:
        raise EdgeLLMError(
            f"{folder} was written with a global batch of {saved_global} examples, this launch makes "
            f"{global_batch}; set training.global_batch_size: {saved_global} (or --set resume=false)"
        )
    set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
    saved = torch.load(folder / "trainer.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rngs = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]
    if saved_procs == procs.size and len(rngs) == procs.size:
        _set_rng_state(rngs[procs.rank])
    else:
        log.warning(
            "%s was written by %d process(es), this run has %d: the data continues where it was, dropout masks "
            "are drawn afresh",
            folder,
            saved_procs,
            procs.size,
        )
        torch.manual_seed(1_000_003 * (state["step"] * procs.size + procs.rank + 1))
    return state


def _rng_state(device: str) -> dict[str, Any]:
    import torch

    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if is_cuda(device):
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _set_rng_state(rng: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        cuda = rng["cuda"]
        if isinstance(cuda, list):  # single-process checkpoints of earlier versions: every device's state
            torch.cuda.set_rng_state_all(cuda)
        else:
            torch.cuda.set_rng_state(cuda)
