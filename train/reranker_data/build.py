"""Build train/reranker_data/stdlib_docstrings.jsonl from the docstrings of the Python standard library.

Run with the interpreter whose standard library you want to read (the shipped file was built with CPython
3.11.7):

    .venv/bin/python train/reranker_data/build.py

Each record is one documented function, method or class of a public standard-library module:

    {"id": "shutil.copytree", "module": "shutil", "split": "train",
     "query": "Recursively copy a directory tree and return the destination directory.",
     "passage": "shutil.copytree(src, dst, symlinks=False, ...): If the optional symlinks flag is true, ..."}

- ``query`` is the docstring's summary paragraph (or, for a one-paragraph docstring, its first sentence), as
  written (whitespace collapsed): a description of what the object does, the way a developer searching
  documentation phrases a need.
- ``passage`` is the object's dotted name and signature followed by the *rest* of the docstring (the summary is
  removed, so the query never appears verbatim in its passage), cut to ``MAX_PASSAGE_WORDS`` words.
- ``split`` holds out whole modules (``sha1(dotted module name) % 100 < TEST_PERCENT``), so no held-out query
  shares a module, and so a family of sibling docstrings, with a training query.

Queries that occur more than once (inherited or copied docstrings) are dropped because they have no single
answer, as are passages whose body repeats another's. The output is sorted and deterministic for a given Python.
The text is the Python standard library's, under the PSF License Version 2 (see README.md and LICENSE-PSF.txt).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import pkgutil
import re
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

OUT = Path(__file__).with_name("stdlib_docstrings.jsonl")
TEST_PERCENT = 20
MIN_QUERY_WORDS, MAX_QUERY_WORDS = 4, 30
MIN_PASSAGE_WORDS, MAX_PASSAGE_WORDS = 12, 64
MAX_SIGNATURE_CHARS = 80

# Modules with side effects on import, platform-specific ones, GUIs, tests and tooling internals.
SKIP = {
    "antigravity",
    "this",
    "idlelib",
    "lib2to3",
    "test",
    "turtledemo",
    "tkinter",
    "turtle",
    "ensurepip",
    "venv",
    "pydoc_data",
    "__future__",
    "msilib",
    "winreg",
    "winsound",
    "nt",
    "msvcrt",
    "xxsubtype",
    "xxlimited",
    "xxlimited_35",
    "sre_compile",
    "sre_constants",
    "sre_parse",
    "distutils",
    "pip",
}
SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")
MEMORY_ADDRESS = re.compile(r" at 0x[0-9a-f]+")
SENTENCE_END = re.compile(r"(?<=[a-z)][.!?])\s+(?=[A-Z])")


def stdlib_modules() -> Iterator[str]:
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP:
            continue
        yield name
        try:
            module = importlib.import_module(name)
        except Exception:
            continue
        if hasattr(module, "__path__"):
            for info in pkgutil.walk_packages(module.__path__, prefix=f"{name}."):
                parts = info.name.split(".")
                if any(p.startswith("_") or p in ("test", "tests") for p in parts):
                    continue
                yield info.name


def documented(module_name: str) -> Iterator[tuple[str, object]]:
    """(dotted name, object) for public functions, classes and methods defined in ``module_name``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(module_name)
    except Exception:
        return
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue
        if inspect.isclass(obj):
            yield f"{module_name}.{name}", obj
            for attr, member in sorted(vars(obj).items()):
                if attr.startswith("_"):
                    continue
                if isinstance(member, staticmethod | classmethod):
                    member = member.__func__
                if inspect.isroutine(member) or isinstance(member, property):
                    yield f"{module_name}.{name}.{attr}", member
        elif inspect.isroutine(obj):
            yield f"{module_name}.{name}", obj


def signature(obj: object) -> str:
    if isinstance(obj, property):
        return ""
    try:
        sig = str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "(...)" if callable(obj) else ""
    sig = MEMORY_ADDRESS.sub("", sig)  # <function copy2 at 0x7f...> -> <function copy2>: reproducible
    if len(sig) <= MAX_SIGNATURE_CHARS:
        return sig
    cut = sig.rfind(", ", 0, MAX_SIGNATURE_CHARS - 5)  # at a parameter boundary
    return (sig[:cut] if cut > 0 else sig[: MAX_SIGNATURE_CHARS - 5]) + ", ...)"


def split_doc(doc: str) -> tuple[str, str] | None:
    """(summary paragraph, rest) of a docstring, or None when it has no usable summary or body."""
    lines = inspect.cleandoc(doc).splitlines()
    while lines and (not lines[0].strip() or SIGNATURE_LINE.match(lines[0].strip())):
        lines.pop(0)
    paragraphs = re.split(r"\n\s*\n", "\n".join(lines).strip())
    if len(paragraphs) == 1:  # one paragraph: its first sentence is the summary
        paragraphs = SENTENCE_END.split(" ".join(paragraphs[0].split()), maxsplit=1)
    if len(paragraphs) < 2:
        return None
    summary = " ".join(paragraphs[0].split())
    body = " ".join(" ".join(paragraphs[1:]).split())
    if (
        not MIN_QUERY_WORDS <= len(summary.split()) <= MAX_QUERY_WORDS
        or len(body.split()) < MIN_PASSAGE_WORDS
    ):
        return None
    words = body.split()
    if len(words) > MAX_PASSAGE_WORDS:
        body = " ".join(words[:MAX_PASSAGE_WORDS]) + " ..."
    return summary, body


def is_test_module(module_name: str) -> bool:
    return int(hashlib.sha1(module_name.encode()).hexdigest(), 16) % 100 < TEST_PERCENT


def main() -> None:
    records = []
    seen_ids = set()
    for module_name in stdlib_modules():
        for dotted, obj in documented(module_name):
            doc = getattr(obj, "__doc__", None)
            if not isinstance(doc, str) or dotted in seen_ids:
                continue
            parts = split_doc(doc)
            if parts is None:
                continue
            seen_ids.add(dotted)
            summary, body = parts
            records.append(
                {
                    "id": dotted,
                    "module": module_name,
                    "split": "test" if is_test_module(module_name) else "train",
                    "query": summary,
                    "passage": f"{dotted}{signature(obj)}: {body}",
                    "_body": body,
                }
            )
    query_counts = Counter(r["query"].lower() for r in records)
    body_counts = Counter(r["_body"] for r in records)
    kept = [r for r in records if query_counts[r["query"].lower()] == 1 and body_counts[r["_body"]] == 1]
    kept.sort(key=lambda r: r["id"])
    with OUT.open("w", encoding="utf-8") as f:
        for r in kept:
            r.pop("_body")
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    splits = Counter(r["split"] for r in kept)
    print(
        f"{OUT}: {len(kept)} records ({dict(splits)}) from Python {sys.version.split()[0]}", file=sys.stderr
    )


if __name__ == "__main__":
    main()
