"""The train stage's behaviour check, the one public function other stages call: did the fine-tuned behaviour
survive (a merge, a conversion, a quantization)?

Held-out prompts (the test split's conversations up to their last assistant turn and, optionally, a file of
prompts unlike the training ones), one greedy answer to each from whatever runs the model (transformers in
`edgellm train eval`, llama.cpp in `edgellm convert --check-behaviour`), and the share of answers that start with
``eval.expect_prefix`` and finish within ``eval.max_words`` words.

    behaviour_check(Path("runs/demo"), model.chat)   # {"pass_share": 0.9, "prompts": 40, "answers": [...], ...}
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from edgellm.errors import EdgeLLMError
from edgellm.paths import resolve_input
from edgellm.train import data as D
from edgellm.train.config import EvalSettings, load_train_config


class Answer(Protocol):
    """One greedy answer: its text and whether it ended (end of turn) before the token limit."""

    @property
    def text(self) -> str: ...

    @property
    def finished(self) -> bool: ...


# (messages, max_new_tokens) -> the model's greedy answer
Answerer = Callable[[list[D.Message], int], Answer]


def behaviour_check(run: Path, answer: Answerer, max_prompts: int | None = None) -> dict[str, Any]:
    """Run the behaviour check of the training run ``run`` (``config.yaml`` + ``data/``) through ``answer``.

    ``max_prompts`` takes that many prompts, alternating between the test split and the extra prompts file.
    Returns the pass, prefix and within-words shares, the number of prompts and each answer with its checks.
    """
    config = load_train_config(run / "config.yaml")
    prompts = held_out_prompts(config.eval, D.read_split(run / "data")["test"])
    if max_prompts is not None:
        by_set = [[p for p in prompts if p["set"] == s] for s in ("test", "extra")]
        mixed = [p for pair in itertools.zip_longest(*by_set) for p in pair if p is not None]
        prompts = mixed[:max_prompts]
    checks = []
    for p in prompts:
        reply = answer(p["messages"], config.eval.max_new_tokens)
        text = reply.text.strip()
        checks.append({"set": p["set"], "answer": text, **check_answer(text, reply.finished, config.eval)})
    n = max(len(checks), 1)
    return {
        "pass_share": sum(c["pass"] for c in checks) / n,
        "prefix_share": sum(c["prefix"] for c in checks) / n,
        "within_words_share": sum(c["within_words"] for c in checks) / n,
        "prompts": len(checks),
        "answers": checks,
    }


def held_out_prompts(settings: EvalSettings, test: list[D.Example]) -> list[dict[str, Any]]:
    """Conversations up to (not including) the last assistant turn, from the test split and the prompts file."""
    out: list[dict[str, Any]] = []
    if settings.use_test_split:
        for ex in test:
            msgs = ex.as_messages()
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            out.append({"set": "test", "messages": msgs[:last]})
    if settings.prompts is not None:
        path = resolve_input(settings.prompts)
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if "prompt" not in obj:
                raise EdgeLLMError(f"{path}:{lineno}: missing field 'prompt'")
            out.append({"set": "extra", "messages": [{"role": "user", "content": obj["prompt"]}]})
    return out


def check_answer(answer: str, finished: bool, settings: EvalSettings) -> dict[str, Any]:
    words = len(answer.split())
    prefix = settings.expect_prefix is None or answer.startswith(settings.expect_prefix)
    within = settings.max_words is None or (finished and words <= settings.max_words)
    return {
        "words": words,
        "finished": finished,
        "prefix": prefix,
        "within_words": within,
        "pass": prefix and within,
    }
