"""`edgellm train merge runs/<name>`: merge a trained adapter into a 16-bit model for the GGUF converter.

The adapter is merged into the base reloaded *unquantized*, never into the 4-bit layers (that would leave packed
uint8 weights and a bitsandbytes ``quantization_config``, which the converter rejects). ``merge.base`` picks the
weights it is merged into: ``original`` (the base as shipped) or ``dequantized`` (dequant(NF4(W)), what the
adapter was trained against). Both are measured: the KL divergence of each merged model from the live adapter
model on the validation split goes to ``merge_report.json``. A merged model identical to its base is refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from edgellm.errors import EdgeLLMError
from edgellm.fsutil import atomic_path, atomic_write_text
from edgellm.train import data as D
from edgellm.train.config import TrainConfig, load_train_config
from edgellm.train.modeling import (
    base_model_dir,
    batches,
    collate,
    load_base,
    load_live_adapter,
    load_tokenizer,
    pick_device,
    token_logprobs,
)

log = logging.getLogger(__name__)


def adapter_folders(run: Path) -> list[Path]:
    """A run folder with ``adapter/``, or a multi-dataset run whose subfolders each have one."""
    run = Path(run)
    if (run / "adapter").is_dir():
        return [run]
    found = sorted(p for p in run.iterdir() if (p / "adapter").is_dir()) if run.is_dir() else []
    if not found:
        raise EdgeLLMError(
            f"{run}: no adapter/ here (train first: edgellm train --config configs/train/<name>.yaml)"
        )
    return found


def merge_run(run: Path, base: str | None = None, dtype: str | None = None) -> list[dict[str, Any]]:
    return [merge_adapter(folder, base, dtype) for folder in adapter_folders(run)]


def merge_adapter(folder: Path, base: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    """Merge ``folder/adapter`` into ``folder/merged``; return (and write) the report."""
    import torch
    from peft import PeftModel

    overrides: dict[str, Any] = {"merge.base": base, "merge.dtype": dtype}
    config: TrainConfig = load_train_config(folder / "config.yaml", overrides)
    base_path = base_model_dir(config.base_model)
    device = pick_device(config.device)
    torch_dtype = getattr(torch, config.merge.dtype)
    adapter_dir = folder / "adapter"
    tokenizer = load_tokenizer(str(adapter_dir))
    val = [
        D.encode(tokenizer, ex.as_messages(), config.data.loss_on)
        for ex in D.read_split(folder / "data")["validation"]
    ]

    live = load_live_adapter(base_path, adapter_dir, device, config.quantization)
    kinds = ["original", "dequantized"] if config.merge.compare_bases else [config.merge.base]
    dequantized = dequantized_linear_weights(live) if "dequantized" in kinds else {}
    original = load_base(base_path, device).eval()
    merged: dict[str, Any] = {}
    for kind in kinds:
        model = load_base(base_path, device)
        if kind == "dequantized":
            if not dequantized:
                raise EdgeLLMError(
                    "merge.base: dequantized needs a 4-bit trained adapter (quantization.load_in_4bit)"
                )
            model.load_state_dict(dequantized, strict=False)
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        # What gets saved is the 16-bit model; measure that, computing in float32.
        merged[kind] = model.to(torch_dtype).to(torch.float32).eval()

    kl = kl_divergences(live, merged, val, tokenizer.pad_token_id, device) if val else {}
    chosen = merged[config.merge.base]
    changed = changed_tensors(original, chosen, torch_dtype)
    if not changed:
        raise EdgeLLMError(
            f"the merged model is identical to its base in {config.merge.dtype}: the adapter in {adapter_dir} "
            "changes nothing (untrained, or its updates round away); refusing to write it"
        )
    report = {
        "adapter": str(adapter_dir),
        "base_model": base_path,
        "merge_base": config.merge.base,
        "dtype": config.merge.dtype,
        "kl_from_adapter_model": kl,
        "validation_examples": len(val),
        "changed_tensors": len(changed),
    }
    for kind, value in kl.items():
        log.info("KL(live adapter || merged into %s base) on validation: %.3g nats/token", kind, value)

    out = folder / "merged"
    chosen = chosen.to(torch_dtype)
    chosen.config.dtype = torch_dtype
    if hasattr(chosen.config, "quantization_config"):
        del chosen.config.quantization_config
    with atomic_path(out) as tmp:
        chosen.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if "quantization_config" in json.loads((tmp / "config.json").read_text()):
            raise EdgeLLMError("the merged config still has a quantization_config; not writing it")
    atomic_write_text(folder / "merge_report.json", json.dumps(report, indent=2) + "\n")
    log.info("merged model (%s, into the %s base) saved in %s", config.merge.dtype, config.merge.base, out)
    return report


def dequantized_linear_weights(live: Any) -> dict[str, Any]:
    """dequant(NF4(W)) for every 4-bit layer of a (PEFT-wrapped) model, keyed like the plain model's state dict."""
    import bitsandbytes as bnb

    out = {}
    for name, module in live.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = (
                bnb.functional.dequantize_4bit(module.weight.data, getattr(module.weight, "quant_state", None))
                .float()
                .cpu()
            )
            key = name.removeprefix("base_model.model.").replace(".base_layer", "") + ".weight"
            out[key] = weight
    return out


def kl_divergences(
    live: Any, merged: dict[str, Any], rows: list[dict[str, list[int]]], pad_id: int, device: str
) -> dict[str, float]:
    """Mean KL(live || merged) per labelled token, for each merged model."""
    import torch

    totals = dict.fromkeys(merged, 0.0)
    count = 0
    with torch.no_grad():
        for chunk in batches(rows, 8):
            batch = collate(chunk, pad_id, device)
            ref, labels = token_logprobs(live, batch)
            count += labels.numel()
            for kind, model in merged.items():
                lp, _ = token_logprobs(model, batch)
                totals[kind] += float((ref.exp() * (ref - lp)).sum())
    return {k: v / max(count, 1) for k, v in totals.items()}


def changed_tensors(base: Any, merged: Any, dtype: Any) -> list[str]:
    """Names of the tensors that differ between base and merged once both are cast to the saved dtype."""
    import torch

    ref = base.state_dict()
    changed = []
    for name, tensor in merged.state_dict().items():
        if name in ref and not torch.equal(ref[name].to(dtype), tensor.to(dtype)):
            changed.append(name)
    return changed
