"""One validated YAML per stage, with CLI and environment overrides.

``load_config(Model, path, overrides, env_prefix)`` reads the YAML, applies ``EDGELLM_<STAGE>__KEY`` environment
variables, then CLI overrides (``{"port": 9000, "models.0.n_ctx": 4096}``), and validates with pydantic.
Errors name the key, the file and its line: ``configs/serve.yaml:3: port: Input should be a valid integer``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from edgellm.errors import ConfigError

__all__ = ["ConfigError", "load_config", "parse_overrides", "parse_scalar"]

M = TypeVar("M", bound=BaseModel)


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in a YAML document to its 1-based line number."""
    lines: dict[tuple[str, ...], int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines

    def walk(node: yaml.Node | None, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key_path = (*path, str(key_node.value))
                lines[key_path] = key_node.start_mark.line + 1
                walk(value_node, key_path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                item_path = (*path, str(i))
                lines[item_path] = item.start_mark.line + 1
                walk(item, item_path)

    walk(root, ())
    return lines


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """Read a YAML mapping; errors give the file, line and reason."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        reason = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: invalid YAML: {reason}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: expected a mapping of settings at the top level, got {type(data).__name__}")
    return data, _key_lines(text)


def parse_scalar(text: str) -> Any:
    """Parse an override value the way YAML would (``8000`` -> int, ``true`` -> bool, ``[a, b]`` -> list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


class _Null:
    """The value of ``--set KEY=null``: KEY becomes null. (A plain ``None`` among overrides means "not given", as
    CLI options left unset pass it.)"""

    def __repr__(self) -> str:
        return "null"


NULL = _Null()


def parse_overrides(items: Sequence[str] | None, flag: str = "--set") -> dict[str, Any]:
    """``["training.max_steps=10", "merge.enabled=false"]`` -> ``{"training.max_steps": 10, "merge.enabled": False}``.

    The one parser of ``--set KEY=VALUE`` for every stage; values are read as YAML scalars (``null``, ``~`` or
    nothing after ``=``: ``NULL``, which sets KEY to null).
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE (for example {flag} port=9000)")
        parsed = parse_scalar(value)
        out[key.strip()] = NULL if parsed is None else parsed
    return out


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.0.c`` in nested dicts/lists, creating mappings as needed."""
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            try:
                idx = int(part)
                node[idx]
            except (ValueError, IndexError):
                raise ConfigError(f"{dotted}: no list item {part!r}") from None
            if last:
                node[idx] = value
            else:
                node = node[idx]
        else:
            if last:
                node[part] = value
            else:
                if not isinstance(node.get(part), dict | list):
                    node[part] = {}
                node = node[part]


def env_overrides(prefix: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``EDGELLM_SERVE__PORT=9000`` -> ``{"port": 9000}``; ``__`` separates nested keys."""
    environ = os.environ if environ is None else environ
    head = prefix.rstrip("_") + "__"
    out: dict[str, Any] = {}
    for name, value in environ.items():
        if name.startswith(head) and len(name) > len(head):
            key = name[len(head) :].lower().replace("__", ".")
            out[key] = parse_scalar(value)
    return out


def format_validation_error(
    err: ValidationError, source: str, lines: dict[tuple[str, ...], int] | None = None
) -> str:
    msgs = []
    for item in err.errors():
        loc = tuple(str(p) for p in item["loc"])
        key = ".".join(loc) or "<root>"
        line = None
        if lines:
            probe = loc
            while probe and probe not in lines:
                probe = probe[:-1]
            line = lines.get(probe)
        where = f"{source}:{line}" if line else source
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling)"
        value = item.get("input")
        shown = "" if item["type"] in ("missing", "extra_forbidden") or isinstance(value, dict) else f" (got {value!r})"
        msgs.append(f"{where}: {key}: {msg}{shown}")
    return "\n".join(msgs)


def load_config(
    model: type[M],
    path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    env_prefix: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> M:
    """Build a validated settings object from YAML + environment + CLI overrides (later wins)."""
    data: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    source = str(path) if path else "settings"
    if path is not None:
        data, lines = read_yaml(Path(path))
    if env_prefix:
        for key, value in env_overrides(env_prefix, environ).items():
            set_dotted(data, key, value)
    for key, value in (overrides or {}).items():
        if value is NULL:
            set_dotted(data, key, None)
        elif value is not None:  # None: an option not given
            set_dotted(data, key, value)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, lines)) from None


def dump_config(settings: BaseModel) -> str:
    return yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False)
