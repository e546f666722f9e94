"""Checks on every GGUF written: it loads in llama.cpp and greedy-generates with its own chat template, its tokenizer
matches the Hugging Face one, and its next-token distributions match the Hugging Face model's (KL divergence).

The Hugging Face side is computed once per conversion (`hf_reference`) and compared against each file. The GGUF side
runs on `convert.runner.GGUFRunner` (llama.cpp with explicit model parameters: no extra CPU buffer types).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.convert.llamacpp import ConvertError
from edgellm.convert.runner import GGUFRunner
from edgellm.manifest import Verification

log = logging.getLogger(__name__)

DEFAULT_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Water boils at a temperature of 100 degrees",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village by the sea, there lived",
)
GENERATE_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


class RoundTripError(ConvertError):
    """The 16-bit GGUF does not reproduce the Hugging Face model: a conversion bug."""


@dataclass(frozen=True)
class HFReference:
    """Token ids and float32 log-probabilities of the Hugging Face model on a few prompts."""

    prompts: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]
    logprobs: tuple[np.ndarray, ...]  # one [n_tokens, n_vocab] array per prompt


def hf_reference(model_dir: Path, prompts: Sequence[str] = DEFAULT_PROMPTS) -> HFReference:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = model_reference(model, tokenizer, prompts)
    del model
    return reference


def model_reference(model: Any, tokenizer: Any, prompts: Sequence[str]) -> HFReference:
    """`HFReference` of a loaded transformers model (float32), e.g. a base with a LoRA adapter merged in."""
    import torch

    model.eval()
    ids_all, lps = [], []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            logits = model(torch.tensor([ids])).logits[0].float()
            ids_all.append(tuple(int(i) for i in ids))
            lps.append(torch.log_softmax(logits, dim=-1).numpy())
    return HFReference(prompts=tuple(prompts), token_ids=tuple(ids_all), logprobs=tuple(lps))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_to_reference(model: GGUFRunner, reference: HFReference, result: Verification, label: str) -> None:
    """Fill ``result`` with the tokenizer check and KL(hf || gguf) over every position of the reference prompts."""
    tokenizer_ok = True
    kls: list[float] = []
    top1: list[bool] = []
    for prompt, ids, hf_lp in zip(reference.prompts, reference.token_ids, reference.logprobs, strict=True):
        ours = model.tokenize(prompt, add_bos=True, special=True)
        if list(ours) != list(ids):
            tokenizer_ok = False
            log.warning(
                "%s tokenizes %r as %s, Hugging Face as %s", label, prompt[:30], ours[:12], list(ids[:12])
            )
        gg_lp = _log_softmax(model.logits(list(ids)))
        if gg_lp.shape != hf_lp.shape:
            raise RoundTripError(
                f"{label}: vocabulary size {gg_lp.shape[1]} differs from Hugging Face's {hf_lp.shape[1]}"
            )
        p = np.exp(hf_lp.astype(np.float64))
        kls.extend((p * (hf_lp - gg_lp)).sum(axis=-1).tolist())
        top1.extend((hf_lp.argmax(-1) == gg_lp.argmax(-1)).tolist())
    result.tokenizer_matches_hf = tokenizer_ok
    result.kl_mean = float(np.mean(kls))
    result.kl_max = float(np.max(kls))
    result.kl_p99 = float(np.percentile(kls, 99))
    result.top1_agreement = float(np.mean(top1))
    result.n_positions = len(kls)
    log.info(
        "%s: KL(hf || gguf) mean %.2e p99 %.2e max %.2e over %d positions, top-1 agreement %.3f",
        label,
        result.kl_mean,
        result.kl_p99,
        result.kl_max,
        result.n_positions,
        result.top1_agreement,
    )


def verify_gguf(
    path: Path,
    reference: HFReference | None,
    kl_threshold: float | None = None,
    n_threads: int | None = None,
    label: str | None = None,
) -> Verification:
    """Load ``path`` in llama.cpp, compare it to ``reference``, and greedy-generate through its embedded chat template.

    With ``kl_threshold`` set, a mean KL divergence above it (or a tokenizer mismatch) raises `RoundTripError`.
    """
    label = label or path.name
    n_ctx = max([256, *(len(ids) + 8 for ids in (reference.token_ids if reference else ()))])
    with GGUFRunner(path, n_ctx=n_ctx, n_threads=n_threads) as model:
        result = Verification(loads=True, prompt=GENERATE_MESSAGES[0]["content"])
        if reference is not None:
            compare_to_reference(model, reference, result, label)
            result.kl_threshold = kl_threshold
            if kl_threshold is not None and not result.tokenizer_matches_hf:
                raise RoundTripError(
                    f"{label}: the embedded tokenizer does not match the Hugging Face tokenizer"
                )
            if kl_threshold is not None and not (result.kl_mean or 0.0) < kl_threshold:
                raise RoundTripError(
                    f"{label} does not reproduce the Hugging Face model: mean KL divergence {result.kl_mean:.3g} "
                    f"(max {result.kl_max:.3g}) over {result.n_positions} positions, threshold {kl_threshold:g}"
                )
        if "tokenizer.chat_template" not in model.metadata:
            raise ConvertError(f"{label} has no chat template inside (tokenizer.chat_template)")
        answer = model.chat(GENERATE_MESSAGES, max_tokens=16)
        result.greedy_text = answer.text
        if answer.n_tokens < 1:
            raise ConvertError(f"{label} loaded but generated nothing (end of sequence right away)")
        return result
