"""The train stage's behaviour check, the one public function other stages call: did the fine-tuned behaviour
survive (a merge, a conversion, a quantization)?

Held-out prompts (the test split's conversations up to their last assistant turn and, optionally, a file of
prompts unlike the training ones), one greedy answer to each from whatever runs the model (transformers in
`edgellm train eval`, llama.cpp in `edgellm convert --check-behaviour`), and the share of answers that pass every
behaviour the run's ``eval`` sets: start with ``expect_prefix`` (Hammy's "Squeak!"), end with ``expect_suffix``
(Olive's closing line), are exactly ``numbered_steps`` numbered lines (Pip's three steps), finish within
``max_words`` words.

    behaviour_check(Path("runs/demo"), model.chat)   # {"pass_share": 0.9, "prompts": 40, "answers": [...], ...}
"""

from __future__ import annotations

import itertools
import json
import re
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
    return {**shares(checks, config.eval), "prompts": len(checks), "answers": checks}


def shares(checks: list[dict[str, Any]], settings: EvalSettings) -> dict[str, float]:
    """``pass_share`` and a ``<check>_share`` for each behaviour ``settings`` ask for, over ``checks``
    (`check_answer` results)."""
    asked = {
        "prefix": settings.expect_prefix,
        "suffix": settings.expect_suffix,
        "steps": settings.numbered_steps,
        "within_words": settings.max_words,
    }
    n = max(len(checks), 1)
    out = {"pass_share": sum(c["pass"] for c in checks) / n}
    out.update({f"{k}_share": sum(c[k] for c in checks) / n for k, v in asked.items() if v is not None})
    return out


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


def has_behaviour(settings: EvalSettings) -> bool:
    """Whether ``settings`` define any behaviour to check."""
    return any(
        v is not None
        for v in (settings.expect_prefix, settings.expect_suffix, settings.numbered_steps, settings.max_words)
    )


def check_answer(answer: str, finished: bool, settings: EvalSettings) -> dict[str, Any]:
    """Each behaviour check on one answer (a check the settings do not ask for passes) and ``pass``: all of them."""
    words = len(answer.split())
    n_steps = numbered_steps(answer)
    checks = {
        "prefix": settings.expect_prefix is None or answer.startswith(settings.expect_prefix),
        "suffix": settings.expect_suffix is None or answer.rstrip().endswith(settings.expect_suffix),
        "steps": settings.numbered_steps is None or n_steps == settings.numbered_steps,
        "within_words": settings.max_words is None or (finished and words <= settings.max_words),
    }
    return {"words": words, "finished": finished, "numbered_steps": n_steps, **checks, "pass": all(checks.values())}


_STEP = re.compile(r"(\d+)[.)]\s+\S")


def numbered_steps(answer: str) -> int:
    """How many numbered steps ``answer`` is: its non-empty lines are ``1. ...``, ``2. ...`` ... ``n. ...`` in order
    and nothing else (``1)`` counts too); 0 when it is not such a list."""
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    for i, line in enumerate(lines, start=1):
        m = _STEP.match(line)
        if m is None or int(m.group(1)) != i:
            return 0
    return len(lines)
