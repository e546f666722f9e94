"""Instruction data: read JSONL (alpaca or chat), validate every line, split, and tokenize through a chat template.

Validation never stays silent: each bad line is reported with its line number and reason, and the caller
chooses to skip the bad lines (and log them) or to fail.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgellm.errors import EdgeLLMError
from edgellm.fsutil import atomic_write_text

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
Format = Literal["auto", "alpaca", "chat"]
Message = dict[str, str]


class DataError(EdgeLLMError):
    """The data has bad lines and the recipe says to fail, or it cannot be used at all."""


@dataclass(frozen=True)
class Issue:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass(frozen=True)
class Example:
    """One valid conversation and where it came from."""

    messages: tuple[tuple[str, str], ...]
    source: str
    line: int

    def as_messages(self) -> list[Message]:
        return [{"role": r, "content": c} for r, c in self.messages]


@dataclass
class DataReport:
    examples: list[Example] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    lines: int = 0

    def summary(self) -> str:
        return f"{self.lines} lines: {len(self.examples)} valid, {len(self.issues)} bad"


def _nonempty_str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"empty text in {where}")
    return value


def parse_record(obj: Any, fmt: Format = "auto") -> list[Message]:
    """Turn one JSON object (alpaca or chat) into messages; ValueError names what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if fmt == "auto":
        fmt = "chat" if "messages" in obj else "alpaca" if "instruction" in obj or "output" in obj else "auto"
        if fmt == "auto":
            raise ValueError(
                "missing field: expected 'messages' (chat) or 'instruction' and 'output' (alpaca)"
            )
    if fmt == "alpaca":
        for key in ("instruction", "output"):
            if key not in obj:
                raise ValueError(f"missing field '{key}'")
        prompt = _nonempty_str(obj["instruction"], "'instruction'")
        extra = obj.get("input")
        if extra is not None and not isinstance(extra, str):
            raise ValueError(f"'input' must be a string, got {type(extra).__name__}")
        if extra and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        return [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _nonempty_str(obj["output"], "'output'")},
        ]
    if "messages" not in obj:
        raise ValueError("missing field 'messages'")
    raw = obj["messages"]
    if not isinstance(raw, list) or not raw:
        raise ValueError("'messages' must be a non-empty list")
    messages: list[Message] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"missing field 'messages[{i}].{key}'")
        if m["role"] not in ROLES:
            raise ValueError(
                f"unknown role {m['role']!r} in messages[{i}] (expected one of {', '.join(ROLES)})"
            )
        messages.append({"role": m["role"], "content": _nonempty_str(m["content"], f"messages[{i}].content")})
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise ValueError("no assistant message to learn from")
    first = next(r for r in roles if r != "system")
    if first != "user":
        raise ValueError("the first non-system message must come from the user")
    return messages


def read_examples(
    path: Path,
    fmt: Format = "auto",
    max_tokens: int | None = None,
    count_tokens: Any = None,
    forbidden_phrases: Sequence[str] = (),
) -> DataReport:
    """Validate every line of a JSONL file; return the valid examples and one issue per bad line.

    ``count_tokens(messages) -> int`` measures a conversation as the model will see it (chat template
    included); with ``max_tokens`` it rejects lines that are too long.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    report = DataReport()
    seen: dict[str, int] = {}
    phrases = [(p, p.casefold()) for p in forbidden_phrases if p.strip()]
    name = str(path)
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            report.lines = lineno
            text = raw.strip()
            if not text:
                report.issues.append(Issue(name, lineno, "empty line"))
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                report.issues.append(Issue(name, lineno, f"not JSON: {e.msg} at column {e.colno}"))
                continue
            try:
                messages = parse_record(obj, fmt)
            except ValueError as e:
                report.issues.append(Issue(name, lineno, str(e)))
                continue
            key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
            if key in seen:
                report.issues.append(Issue(name, lineno, f"exact duplicate of line {seen[key]}"))
                continue
            seen[key] = lineno
            hit = next(
                ((p, m) for p, folded in phrases for m in messages if folded in m["content"].casefold()), None
            )
            if hit:
                report.issues.append(
                    Issue(name, lineno, f"forbidden phrase {hit[0]!r} in a {hit[1]['role']} message")
                )
                continue
            if max_tokens is not None and count_tokens is not None:
                n = count_tokens(messages)
                if n > max_tokens:
                    report.issues.append(
                        Issue(name, lineno, f"too long: {n} tokens, over the limit of {max_tokens}")
                    )
                    continue
            report.examples.append(Example(tuple((m["role"], m["content"]) for m in messages), name, lineno))
    return report


def enforce(report: DataReport, on_invalid: Literal["skip", "fail"]) -> None:
    """Report every bad line; raise if the recipe says to fail (or if nothing valid is left)."""
    for issue in report.issues:
        log.warning("bad line: %s", issue)
    if report.issues and on_invalid == "fail":
        listing = "\n".join(str(i) for i in report.issues)
        raise DataError(f"{len(report.issues)} bad lines (data.on_invalid: fail):\n{listing}")
    if report.issues:
        log.warning("skipping %d bad lines (data.on_invalid: skip)", len(report.issues))
    if not report.examples:
        raise DataError("no valid examples left")


# --- split -------------------------------------------------------------------------------------------------

SPLITS = ("train", "validation", "test")


def split_examples(
    examples: Sequence[Example], fractions: tuple[float, float, float], seed: int
) -> dict[str, list[Example]]:
    """A seeded shuffle cut into train/validation/test; validation and test get at least one example each when
    their fraction is positive and there is enough data."""
    order = list(examples)
    random.Random(seed).shuffle(order)
    n = len(order)
    n_val = round(n * fractions[1]) if fractions[1] > 0 else 0
    n_test = round(n * fractions[2]) if fractions[2] > 0 else 0
    if n >= 3:
        n_val = max(n_val, 1 if fractions[1] > 0 else 0)
        n_test = max(n_test, 1 if fractions[2] > 0 else 0)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise DataError(f"{n} examples are too few for a {fractions} split")
    return {
        "train": order[:n_train],
        "validation": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }


def data_fingerprint(paths: Sequence[Path], settings: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()


def write_split(split: dict[str, list[Example]], folder: Path, fingerprint: str) -> None:
    """Write the split as chat JSONL next to the run (``<run>/data/{train,validation,test}.jsonl``)."""
    for name, rows in split.items():
        text = "".join(
            json.dumps({"messages": ex.as_messages(), "source": f"{ex.source}:{ex.line}"}, ensure_ascii=False)
            + "\n"
            for ex in rows
        )
        atomic_write_text(folder / f"{name}.jsonl", text)
    atomic_write_text(folder / "fingerprint.txt", fingerprint + "\n")


def read_split(folder: Path) -> dict[str, list[Example]]:
    out: dict[str, list[Example]] = {}
    for name in SPLITS:
        rows = []
        path = folder / f"{name}.jsonl"
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            obj = json.loads(line)
            source, _, src_line = obj.get("source", f"{path}:{lineno}").rpartition(":")
            rows.append(
                Example(
                    tuple((m["role"], m["content"]) for m in obj["messages"]), source, int(src_line or lineno)
                )
            )
        out[name] = rows
    return out


# --- tokenization ------------------------------------------------------------------------------------------

IGNORE = -100


def render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode(
    tokenizer: Any, messages: list[Message], loss_on: Literal["assistant", "all"] = "assistant"
) -> dict[str, list[int]]:
    """Token ids through the chat template and labels: assistant tokens only (``-100`` elsewhere), or all.

    Each assistant turn's tokens are those between the prompt rendered up to it (with the generation prompt)
    and the conversation rendered through it, so the closing end-of-turn token is learned too.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the base model's tokenizer has no chat template")
    ids = render(tokenizer, messages)
    if loss_on == "all":
        return {"input_ids": ids, "labels": list(ids)}
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(render(tokenizer, messages[: i + 1]))
        if ids[:end] != render(tokenizer, messages[: i + 1]) or end <= start:
            raise DataError(
                "the chat template does not render conversations prefix by prefix; use data.loss_on: all"
            )
        labels[start:end] = ids[start:end]
    return {"input_ids": ids, "labels": labels}


def token_counter(tokenizer: Any) -> Any:
    return lambda messages: len(render(tokenizer, list(messages)))
