"""Building blocks the train recipes share: resolve and load the base (4-bit or full precision), batch
tokenized examples, measure loss, and the processes a run is spread over (``Processes``: one, or the N that
``accelerate launch`` / ``torchrun`` started). Recipes (qlora.py, merge.py, evaluate.py) compose these."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgellm.errors import EdgeLLMError
from edgellm.paths import resolve_input
from edgellm.train.config import QuantSettings

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def base_model_dir(name: str) -> str:
    """The folder of the QLoRA base model ``name``: a catalog entry (``base``) -> its folder in models/; a path to
    a local folder -> that folder. Anything else is refused: edgellm works offline and never downloads weights (a
    Hugging Face id such as ``org/name`` is not looked up on the hub)."""
    from edgellm.catalog import load_catalog

    catalog = load_catalog()
    if name in catalog:
        path = catalog[name].local_path()
        if not path.exists():
            raise EdgeLLMError(f"base model {name!r} is not in models/; run `edgellm models pull {name}`")
        return str(path)
    path = resolve_input(Path(name))
    if path.is_dir():
        return str(path)
    raise EdgeLLMError(
        f"base_model {name!r}: not a catalog entry ({', '.join(catalog)}) nor a local model folder ({path} does not "
        "exist); edgellm works offline and never downloads weights: put the model (config.json + weights) in a "
        "folder and give its path"
    )


def pick_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise EdgeLLMError("device: cuda was asked for but torch sees no CUDA device")
    return setting


def is_cuda(device: str) -> bool:
    """``cuda`` or ``cuda:<index>`` (one process per GPU)."""
    return device.split(":")[0] == "cuda"


def compute_dtype(device: str) -> torch.dtype:
    """float32 on CPU (bitsandbytes' CPU kernels), bfloat16 on GPUs that have it."""
    import torch

    if is_cuda(device):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(path: str, device: str, quant: QuantSettings | None = None) -> Any:
    """The base model, in 4-bit (bitsandbytes NF4/FP4, optionally double-quantized) when ``quant`` asks for it,
    else unquantized in float32."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quant is None or not quant.load_in_4bit:
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return model.to(device)
    dtype = compute_dtype(device)
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=bnb, dtype=dtype, device_map={"": device}
    )
    keep_4bit_layers_trainable(model)
    return model


def keep_4bit_layers_trainable(model: Any) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, a ``Linear4bit`` run in eval mode without grad repacks its weight into a bf16
    inference layout, for good. Training after that (say, after an evaluation) goes through a kernel with no
    autograd support: gradients stop flowing through the frozen layers, silently. The repacked layout also
    rounds the scales to bf16, so the model is no longer the one the adapter is trained against.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_live_adapter(base_path: str, adapter_dir: Path, device: str, quant: QuantSettings) -> Any:
    """The model as it was trained: the (4-bit) base with the adapter on top, not merged."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(base_path, device, quant), str(adapter_dir))
    return model.eval()


# --- batches and loss ----------------------------------------------------------------------------------------


def collate(
    rows: Sequence[dict[str, list[int]]], pad_id: int, device: str | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padding gets attention 0 and label -100."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()} if device else batch


def batches(rows: Sequence[dict[str, list[int]]], size: int) -> Iterator[Sequence[dict[str, list[int]]]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def token_logprobs(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities over the vocabulary at each labelled position, and the labels there."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    logprobs = torch.log_softmax(logits[:, :-1][keep], dim=-1)
    return logprobs, labels[keep]


def target_count(row: dict[str, list[int]]) -> int:
    """Tokens of ``row`` whose next token is scored (a label other than -100 after the first position)."""
    return sum(1 for label in row["labels"][1:] if label != -100)


def summed_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy summed (not averaged) over the batch's labelled tokens: dividing by the tokens of the whole
    optimizer step, not of each micro-batch, makes the gradient independent of how the step's examples are cut
    into micro-batches and processes."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


def loss_totals(
    model: Any, rows: Sequence[dict[str, list[int]]], pad_id: int, device: str, batch_size: int = 8
) -> tuple[float, int]:
    """Summed cross-entropy and the number of labelled tokens (the model is put in eval mode and left as it was)."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in batches(rows, batch_size):
            logprobs, labels = token_logprobs(model, collate(chunk, pad_id, device))
            total += float(-logprobs.gather(1, labels[:, None]).sum())
            count += int(labels.numel())
    model.train(was_training)
    return total, count


def mean_loss(
    model: Any, rows: Sequence[dict[str, list[int]]], pad_id: int, device: str, batch_size: int = 8
) -> float:
    """Mean cross-entropy per labelled token (the model is put in eval mode and left as it was)."""
    total, count = loss_totals(model, rows, pad_id, device, batch_size)
    return total / max(count, 1)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


# --- processes ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Processes:
    """The processes one run is spread over: just this one, or the ``size`` that ``accelerate launch`` (or
    ``torchrun``) started, this one being ``rank``. Data-parallel (DDP): every process holds the whole model,
    trains on its share of each step's examples, and gradients are averaged before each optimizer step."""

    rank: int = 0
    size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and logs metrics."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def sum(self, values: Sequence[float]) -> list[float]:
        """Each value summed over the processes (float64 on the wire; the same result on every rank)."""
        if self.size == 1:
            return [float(v) for v in values]
        import torch
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return [float(v) for v in t.tolist()]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (any picklable value), in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def wrap(self, model: Any) -> Any:
        """``model`` in DistributedDataParallel when there are several processes, else as it is."""
        if self.size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        index = int(self.device.split(":")[1]) if is_cuda(self.device) and ":" in self.device else None
        # Parameters (the 4-bit base included) are broadcast from rank 0 once; the model has no buffers that
        # change in training, so none are synchronised before each forward.
        return DistributedDataParallel(
            model, device_ids=[index] if index is not None else None, forward_sync_buffers=False
        )

    def no_sync(self, model: Any, sync: bool) -> AbstractContextManager[Any]:
        """Skip the gradient all-reduce of this backward pass unless ``sync`` (the step's last micro-batch)."""
        if self.size == 1 or sync:
            return nullcontext()
        return model.no_sync()  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def join_processes(device_setting: str) -> Processes:
    """This process's place in the run: alone, or one of those started by ``accelerate launch`` / ``torchrun``
    (``WORLD_SIZE`` > 1), joined through accelerate's process group set-up: gloo on CPU, NCCL on GPUs (one GPU per
    process). FSDP and DeepSpeed launches are refused: the recipe's checkpoints assume every process holds the whole
    adapter and optimizer state."""
    device = pick_device(device_setting)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes(0, 1, device)
    for flag, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(flag, "false").lower() == "true":
            raise EdgeLLMError(
                f"{name} was asked for (accelerate launch); the QLoRA recipe trains data-parallel (DDP) only: "
                "launch with `accelerate launch --multi_gpu --num_processes N` (see README, Scaling out)"
            )
    from accelerate import PartialState

    state = PartialState(cpu=not is_cuda(device))
    log.info(
        "process %d of %d on %s (%s backend)",
        state.process_index,
        state.num_processes,
        state.device,
        state.backend,
    )
    return Processes(
        state.process_index, state.num_processes, str(state.device) if is_cuda(device) else "cpu"
    )
