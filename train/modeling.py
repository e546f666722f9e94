"""Building blocks the train recipes share: resolve and load the base (4-bit or full precision), batch
tokenized examples, and measure loss. Recipes (qlora.py, merge.py, evaluate.py) compose these."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
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


def compute_dtype(device: str) -> torch.dtype:
    """float32 on CPU (bitsandbytes' CPU kernels), bfloat16 on GPUs that have it."""
    import torch

    if device == "cuda":
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


def mean_loss(
    model: Any, rows: Sequence[dict[str, list[int]]], pad_id: int, device: str, batch_size: int = 8
) -> float:
    """Mean cross-entropy per labelled token (the model is put in eval mode and left as it was)."""
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
    return total / max(count, 1)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
