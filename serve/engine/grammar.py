"""JSON Schema -> GBNF for llama.cpp's grammar sampler, and the bounded cache of converted schemas.

The rules follow llama.cpp's ``common/json-schema-to-grammar.cpp`` (what ``llama-server`` does for
``response_format``): the same whitespace (``space``: nothing, one space, or one or two newlines and up to 20 spaces
or tabs), JSON strings without raw control characters, numbers of at most 16 digits per part, object properties in
the schema's order (required ones first), and one named rule per ``$ref`` (recursive schemas work). One difference:
llama.cpp warns about a keyword it cannot enforce and drops it; here a keyword that is not enforced is a
``SchemaError`` naming it and where it is, never a silent relaxation.

Enforced: ``type`` (one or a list), ``enum``, ``const``, ``properties``, ``required``, ``additionalProperties``
(``false``; a schema with no ``properties`` is a map of that schema; with ``properties``, ``true`` or a schema,
only the declared properties are generated, which is valid), ``items``, ``prefixItems`` (a tuple of exactly
those items), ``minItems``, ``maxItems``, ``minLength``, ``maxLength``, ``format`` (``date``, ``time``,
``date-time``, ``uuid``), integer ``minimum``/``maximum``/``exclusiveMinimum``/``exclusiveMaximum``, local
``$ref`` (``#``, ``#/$defs/...``, ``#/definitions/...``, any JSON pointer), ``anyOf``, ``allOf`` of one schema.
Annotations are accepted and have no effect (``title``, ``description``, ``default``, ``examples``, ...).
Refused (400): ``pattern``, ``oneOf``, ``not``, ``if``/``then``/``else``, number bounds, ``multipleOf``,
``uniqueItems: true``, ``patternProperties``, ``minProperties``, other formats, remote ``$ref``, and any keyword
not listed here.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

SPACE_RULE = '| " " | "\\n"{1,2} [ \\t]{0,20}'

PRIMITIVE_RULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "boolean": ('("true" | "false")', ()),
    "decimal-part": ("[0-9]{1,16}", ()),
    "integral-part": ("[0] | [1-9] [0-9]{0,15}", ()),
    "number": (
        '("-"? integral-part) ("." decimal-part)? ([eE] [-+]? integral-part)?',
        ("integral-part", "decimal-part"),
    ),
    "integer": ('("-"? integral-part)', ("integral-part",)),
    "value": (
        "object | array | string | number | boolean | null",
        ("object", "array", "string", "number", "boolean", "null"),
    ),
    "object": (
        '"{" space ( string ":" space value ("," space string ":" space value)* )? space "}"',
        ("string", "value"),
    ),
    "array": ('"[" space ( value ("," space value)* )? space "]"', ("value",)),
    "uuid": (
        '"\\"" [0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{12} "\\""',
        (),
    ),
    "char": ('[^"\\\\\\x7F\\x00-\\x1F] | [\\\\] (["\\\\bfnrt] | "u" [0-9a-fA-F]{4})', ()),
    "string": ('"\\"" char* "\\""', ("char",)),
    "null": ('"null"', ()),
    "date": ('[0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [1-2] [0-9] | "3" [0-1] )', ()),
    "time": (
        '([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{3} )? '
        '( "Z" | ( "+" | "-" ) ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )',
        (),
    ),
    "date-time": ('date "T" time', ("date", "time")),
    "date-string": ('"\\"" date "\\""', ("date",)),
    "time-string": ('"\\"" time "\\""', ("time",)),
    "date-time-string": ('"\\"" date-time "\\""', ("date-time",)),
}
RESERVED_NAMES = {"root", "space", *PRIMITIVE_RULES}

ANNOTATIONS = frozenset(
    {
        "title", "description", "default", "examples", "example", "$schema", "$id", "$comment", "$defs",
        "definitions", "deprecated", "readOnly", "writeOnly", "contentMediaType", "contentEncoding",
    }
)
TYPE_KEYWORDS: dict[str, frozenset[str]] = {
    "object": frozenset({"properties", "required", "additionalProperties"}),
    "array": frozenset({"items", "prefixItems", "minItems", "maxItems", "uniqueItems"}),
    "string": frozenset({"minLength", "maxLength", "format"}),
    "integer": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}),
    "number": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}),
    "boolean": frozenset(),
    "null": frozenset(),
}
COMBINERS = frozenset({"$ref", "anyOf", "allOf", "enum", "const", "type"})
KNOWN = ANNOTATIONS | COMBINERS | frozenset().union(*TYPE_KEYWORDS.values())
FORMATS = {"date": "date-string", "time": "time-string", "date-time": "date-time-string", "uuid": "uuid"}
JSON_TYPES = tuple(TYPE_KEYWORDS)
_RULE_NAME_RE = re.compile(r"[^a-zA-Z0-9-]+")


class SchemaError(ValueError):
    """A schema this server cannot turn into a grammar; ``path`` is where in the schema (``properties.age``)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.reason = message


def gbnf_literal(text: str) -> str:
    """``text`` as a GBNF string literal."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def json_literal(value: Any) -> str:
    """A JSON value as the GBNF literal of its compact serialization (what ``enum`` and ``const`` generate)."""
    return gbnf_literal(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def _repetition(item: str, min_n: int, max_n: int | None, sep: str = "") -> str:
    """``item`` repeated ``min_n``..``max_n`` times (None: unbounded), separated by ``sep``."""
    if max_n == 0:
        return ""
    if min_n == 0 and max_n == 1:
        return f"{item}?"
    if not sep:
        if min_n == 1 and max_n is None:
            return f"{item}+"
        if min_n == 0 and max_n is None:
            return f"{item}*"
        return f"{item}{{{min_n},{'' if max_n is None else max_n}}}"
    rest = _repetition(f"({sep} {item})", max(0, min_n - 1), None if max_n is None else max_n - 1)
    result = f"{item} {rest}".rstrip()
    return f"({result})?" if min_n == 0 else result


def _int_range(lo: int | None, hi: int | None, top_level: bool = True, decimals_left: int = 16) -> str:
    """A GBNF expression for the integers in ``[lo, hi]`` (either end open), as llama.cpp's build_min_max_int."""
    out: list[str] = []

    def digit_range(a: str, b: str) -> None:
        out.append(f"[{a}]" if a == b else f"[{a}-{b}]")

    def more_digits(min_d: int, max_d: int | None) -> None:
        out.append("[0-9]")
        if min_d == max_d == 1:
            return
        out.append(f"{{{min_d}" + ("" if max_d == min_d else "," + ("" if max_d is None else str(max_d))) + "}")

    def uniform_range(a: str, b: str) -> None:
        i = 0
        while i < len(a) and i < len(b) and a[i] == b[i]:
            i += 1
        if i > 0:
            out.append(f'"{a[:i]}"')
        if i < len(a) and i < len(b):
            if i > 0:
                out.append(" ")
            sub_len = len(a) - i - 1
            if sub_len > 0:
                a_sub, b_sub = a[i + 1 :], b[i + 1 :]
                zeros, nines = "0" * sub_len, "9" * sub_len
                to_reached = False
                out.append("(")
                if a_sub == zeros:
                    digit_range(a[i], chr(ord(b[i]) - 1))
                    out.append(" ")
                    more_digits(sub_len, sub_len)
                else:
                    out.append(f"[{a[i]}] (")
                    uniform_range(a_sub, nines)
                    out.append(")")
                    if ord(a[i]) < ord(b[i]) - 1:
                        out.append(" | ")
                        if b_sub == nines:
                            digit_range(chr(ord(a[i]) + 1), b[i])
                            to_reached = True
                        else:
                            digit_range(chr(ord(a[i]) + 1), chr(ord(b[i]) - 1))
                        out.append(" ")
                        more_digits(sub_len, sub_len)
                if not to_reached:
                    out.append(" | ")
                    digit_range(b[i], b[i])
                    out.append(" ")
                    uniform_range(zeros, b_sub)
                out.append(")")
            else:
                out.append(f"[{a[i]}-{b[i]}]")

    if lo is not None and hi is not None:
        if lo < 0 and hi < 0:
            return f'"-" ({_int_range(-hi, -lo, True, decimals_left)})'
        if lo < 0:
            out.append(f'"-" ({_int_range(0, -lo, True, decimals_left)}) | ')
            lo = 0
        lo_s, hi_s = str(lo), str(hi)
        for digits in range(len(lo_s), len(hi_s)):
            uniform_range(lo_s, "9" * digits)
            lo_s = "1" + "0" * digits
            out.append(" | ")
        uniform_range(lo_s, hi_s)
        return "".join(out)

    less = max(decimals_left - 1, 1)
    if lo is not None:
        if lo < 0:
            out.append(f'"-" ({_int_range(None, -lo, False, decimals_left)}) | [0] | [1-9] ')
            more_digits(0, decimals_left - 1)
        elif lo == 0:
            if top_level:
                out.append("[0] | [1-9] ")
                more_digits(0, less)
            else:
                more_digits(1, decimals_left)
        elif lo <= 9:
            c = str(lo)
            start = "1" if top_level else "0"
            if c > start:
                digit_range(start, chr(ord(c) - 1))
                out.append(" ")
                more_digits(1, less)
                out.append(" | ")
            digit_range(c, "9")
            out.append(" ")
            more_digits(0, less)
        else:
            lo_s = str(lo)
            c = lo_s[0]
            if c > "1":
                digit_range("1" if top_level else "0", chr(ord(c) - 1))
                out.append(" ")
                more_digits(len(lo_s), less)
                out.append(" | ")
            digit_range(c, c)
            out.append(f" ({_int_range(int(lo_s[1:]), None, False, less)})")
            if c < "9":
                out.append(" | ")
                digit_range(chr(ord(c) + 1), "9")
                out.append(" ")
                more_digits(len(lo_s) - 1, less)
        return "".join(out)
    if hi is not None:
        if hi >= 0:
            if top_level:
                out.append('"-" [1-9] ')
                more_digits(0, less)
                out.append(" | ")
            out.append(_int_range(0, hi, True, decimals_left))
        else:
            out.append(f'"-" ({_int_range(-hi, None, False, decimals_left)})')
        return "".join(out)
    raise ValueError("at least one bound is needed")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _matches_type(value: Any, t: str) -> bool:
    return {
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "integer": _is_int(value) or (isinstance(value, float) and value.is_integer()),
        "number": _is_number(value),
        "boolean": isinstance(value, bool),
        "null": value is None,
    }[t]


def _child(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


class GrammarBuilder:
    """Collects GBNF rules: JSON schemas (``add_schema``) and hand-written rules (``add_rule``) in one grammar.

    Every schema added is its own document: its ``$ref``s resolve inside it. ``grammar()`` renders the rules."""

    def __init__(self) -> None:
        self._rules: dict[str, str] = {"space": SPACE_RULE}
        self._doc: Any = None
        self._refs: dict[str, str] = {}  # "#/$defs/x" of the current document -> its rule name

    # -- rules ----------------------------------------------------------------------------------------------
    def add_rule(self, name: str, body: str) -> str:
        """Add ``name ::= body``; a name already taken by another body gets a numeric suffix. Returns the name."""
        esc = _RULE_NAME_RE.sub("-", name) or "r"
        if self._rules.get(esc, body) == body:
            self._rules[esc] = body
            return esc
        i = 0
        while self._rules.get(f"{esc}{i}", body) != body:
            i += 1
        self._rules[f"{esc}{i}"] = body
        return f"{esc}{i}"

    def primitive(self, name: str) -> str:
        body, deps = PRIMITIVE_RULES[name]
        self._rules[name] = body
        for dep in deps:
            if dep not in self._rules:
                self.primitive(dep)
        return name

    def grammar(self) -> str:
        return "".join(f"{name} ::= {body}\n" for name, body in self._rules.items())

    # -- schemas --------------------------------------------------------------------------------------------
    def add_schema(self, schema: Any, name: str, path: str = "") -> str:
        """Rules for ``schema`` (a JSON schema document); returns the name of its rule."""
        self._doc, self._refs = schema, {}
        try:
            return self._visit(schema, name, path)
        finally:
            self._doc, self._refs = None, {}

    def _visit(self, schema: Any, name: str, path: str) -> str:
        rule_name = name + "-" if name in RESERVED_NAMES else name
        if schema is True:
            return self.add_rule(rule_name, self.primitive("value"))
        if schema is False:
            raise SchemaError(path, "the schema 'false' allows no value at all")
        if not isinstance(schema, Mapping):
            raise SchemaError(path, f"a schema must be a JSON object or a boolean, got {type(schema).__name__}")
        for key in schema:
            if key not in KNOWN:
                raise SchemaError(_child(path, key), f"the keyword '{key}' is not supported (it cannot be enforced)")
        constraining = [k for k in schema if k not in ANNOTATIONS]

        if "$ref" in schema:
            self._alone(schema, "$ref", constraining, path)
            return self.add_rule(rule_name, self._ref(schema["$ref"], _child(path, "$ref")))
        if "anyOf" in schema:
            self._alone(schema, "anyOf", constraining, path)
            alts = schema["anyOf"]
            if not isinstance(alts, list) or not alts:
                raise SchemaError(_child(path, "anyOf"), "must be a non-empty array of schemas")
            where = _child(path, "anyOf")
            names = [self._visit(a, f"{name}-{i}", _child(where, i)) for i, a in enumerate(alts)]
            return self.add_rule(rule_name, " | ".join(names))
        if "allOf" in schema:
            self._alone(schema, "allOf", constraining, path)
            parts = schema["allOf"]
            if not isinstance(parts, list) or len(parts) != 1:
                raise SchemaError(_child(path, "allOf"), "only an allOf of exactly one schema is supported")
            only = self._visit(parts[0], f"{name}-all", _child(_child(path, "allOf"), 0))
            return self.add_rule(rule_name, only)

        types = self._types(schema, path)
        if "const" in schema:
            value = schema["const"]
            if types and not any(_matches_type(value, t) for t in types):
                raise SchemaError(_child(path, "const"), f"{value!r} does not match the schema's type")
            return self.add_rule(rule_name, json_literal(value))
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError(_child(path, "enum"), "must be a non-empty array")
            if types:
                values = [v for v in values if any(_matches_type(v, t) for t in types)]
                if not values:
                    raise SchemaError(_child(path, "enum"), "no value matches the schema's type")
            return self.add_rule(rule_name, " | ".join(dict.fromkeys(json_literal(v) for v in values)))
        if not types:
            return self.add_rule(rule_name, self.primitive("value"))
        if len(types) == 1:
            return self._visit_type(schema, types[0], rule_name, path)
        names = [self._visit_type(schema, t, f"{name}-{t}", path) for t in types]
        return self.add_rule(rule_name, " | ".join(names))

    @staticmethod
    def _alone(schema: Mapping[str, Any], keyword: str, constraining: list[str], path: str) -> None:
        others = [k for k in constraining if k != keyword]
        if others:
            raise SchemaError(
                _child(path, others[0]), f"'{others[0]}' beside '{keyword}' is not supported; move it inside"
            )

    def _types(self, schema: Mapping[str, Any], path: str) -> list[str]:
        """The JSON types the schema allows: its ``type``, or the one its keywords imply ([]: any)."""
        t = schema.get("type")
        if t is None:
            implied = [
                name
                for name, words in TYPE_KEYWORDS.items()
                if name != "number" and any(k in schema for k in words)
            ]
            if len(implied) > 1:
                raise SchemaError(path, f"keywords of several types ({', '.join(implied)}) without 'type'")
            if implied == ["integer"]:
                raise SchemaError(path, "'minimum'/'maximum' without 'type' ('integer' is supported)")
            return implied
        types = t if isinstance(t, list) else [t]
        for x in types:
            if x not in JSON_TYPES:
                raise SchemaError(_child(path, "type"), f"unknown type {x!r}")
        if not types:
            raise SchemaError(_child(path, "type"), "an empty list of types allows no value")
        return list(dict.fromkeys(types))

    def _visit_type(self, schema: Mapping[str, Any], t: str, name: str, path: str) -> str:
        if t == "object":
            return self._object(schema, name, path)
        if t == "array":
            return self._array(schema, name, path)
        if t == "string":
            return self._string(schema, name, path)
        if t == "integer":
            return self._integer(schema, name, path)
        if t == "number":
            for k in TYPE_KEYWORDS["number"]:
                if k in schema:
                    raise SchemaError(_child(path, k), f"'{k}' on a number is not supported (it is on an integer)")
        return self.add_rule(name, self.primitive(t))

    def _object(self, schema: Mapping[str, Any], name: str, path: str) -> str:
        props = schema.get("properties", {})
        if not isinstance(props, Mapping):
            raise SchemaError(_child(path, "properties"), "must be an object")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError(_child(path, "required"), "must be an array of property names")
        for r in required:
            if r not in props:
                raise SchemaError(_child(path, "required"), f"required property {r!r} is not in 'properties'")
        extra = schema.get("additionalProperties", True)
        if not props:
            if extra is True or extra == {}:
                return self.add_rule(name, self.primitive("object"))
            if extra is False:
                return self.add_rule(name, '"{" space "}"')
            value = self._visit(extra, f"{name}-value", _child(path, "additionalProperties"))
            kv = self.add_rule(f"{name}-kv", f'{self.primitive("string")} ":" space {value}')
            return self.add_rule(name, f'"{{" space ({kv} ("," space {kv})*)? space "}}"')
        if not (isinstance(extra, bool) or isinstance(extra, Mapping)):
            raise SchemaError(_child(path, "additionalProperties"), "must be a boolean or a schema")
        if isinstance(extra, Mapping):  # checked, though only the declared properties are generated
            self._visit(extra, f"{name}-additional", _child(path, "additionalProperties"))

        kv_rules: dict[str, str] = {}
        for key, sub in props.items():
            value = self._visit(sub, f"{name}-{key}", _child(_child(path, "properties"), key))
            kv_rules[key] = self.add_rule(f"{name}-{key}-kv", f"{json_literal(key)} space \":\" space {value}")
        req = [k for k in props if k in required]
        opt = [k for k in props if k not in required]

        def optional_chain(keys: list[str], first_optional: bool) -> str:
            head = f'( "," space {kv_rules[keys[0]]} )?' if first_optional else kv_rules[keys[0]]
            if len(keys) == 1:
                return head
            rest = self.add_rule(f"{name}-{keys[0]}-rest", optional_chain(keys[1:], True))
            return f"{head} {rest}"

        body = '"{" space ' + ' "," space '.join(kv_rules[k] for k in req)
        if opt:
            alternatives = " | ".join(optional_chain(opt[i:], False) for i in range(len(opt)))
            body += f' ( "," space ( {alternatives} ) )?' if req else f" ( {alternatives} )?"
        return self.add_rule(name, body + ' space "}"')

    def _array(self, schema: Mapping[str, Any], name: str, path: str) -> str:
        if schema.get("uniqueItems") is True:
            raise SchemaError(_child(path, "uniqueItems"), "'uniqueItems: true' is not supported")
        min_n = self._count(schema, "minItems", path, 0)
        max_n = self._count(schema, "maxItems", path, None)
        items = schema.get("items", True)
        prefix = schema.get("prefixItems")
        if isinstance(items, list):  # draft-04 tuples
            prefix, items = items, False
        if prefix is not None:
            if not isinstance(prefix, list):
                raise SchemaError(_child(path, "prefixItems"), "must be an array of schemas")
            if not isinstance(items, bool):
                raise SchemaError(_child(path, "items"), "'items' after 'prefixItems' is not supported")
            n = len(prefix)
            if min_n > n or (max_n is not None and max_n < n):
                raise SchemaError(path, f"minItems/maxItems do not allow the {n} items of 'prefixItems'")
            where = _child(path, "prefixItems")
            names = [self._visit(s, f"{name}-{i}", _child(where, i)) for i, s in enumerate(prefix)]
            return self.add_rule(name, '"[" space ' + ' "," space '.join(names) + ' space "]"')
        if items is False:
            if min_n > 0:
                raise SchemaError(_child(path, "minItems"), "'items: false' allows no item")
            return self.add_rule(name, '"[" space "]"')
        if items is True and min_n == 0 and max_n is None:
            return self.add_rule(name, self.primitive("array"))
        item = self._visit(items, f"{name}-item", _child(path, "items"))
        return self.add_rule(name, '"[" space ' + _repetition(item, min_n, max_n, '"," space') + ' space "]"')

    def _string(self, schema: Mapping[str, Any], name: str, path: str) -> str:
        fmt = schema.get("format")
        min_n = self._count(schema, "minLength", path, 0)
        max_n = self._count(schema, "maxLength", path, None)
        if fmt is not None:
            if fmt not in FORMATS:
                raise SchemaError(
                    _child(path, "format"), f"format {fmt!r} is not supported (supported: {', '.join(FORMATS)})"
                )
            if "minLength" in schema or "maxLength" in schema:
                raise SchemaError(path, "'format' together with 'minLength'/'maxLength' is not supported")
            return self.add_rule(name, self.primitive(FORMATS[fmt]))
        if min_n == 0 and max_n is None:
            return self.add_rule(name, self.primitive("string"))
        char = self.primitive("char")
        return self.add_rule(name, '"\\"" ' + _repetition(char, min_n, max_n) + ' "\\""')

    def _integer(self, schema: Mapping[str, Any], name: str, path: str) -> str:
        lo: int | None = None
        hi: int | None = None
        for key in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
            if key not in schema:
                continue
            v = schema[key]
            if not _is_number(v):
                raise SchemaError(_child(path, key), "must be a number")
            if key == "minimum":
                bound = math.ceil(v)
            elif key == "exclusiveMinimum":
                bound = math.floor(v) + 1
            elif key == "maximum":
                bound = math.floor(v)
            else:
                bound = math.ceil(v) - 1
            if key.endswith("inimum"):
                lo = bound if lo is None else max(lo, bound)
            else:
                hi = bound if hi is None else min(hi, bound)
        if lo is None and hi is None:
            return self.add_rule(name, self.primitive("integer"))
        if lo is not None and hi is not None and lo > hi:
            raise SchemaError(path, f"no integer is between the bounds ({lo} > {hi})")
        if any(b is not None and abs(b) >= 10**15 for b in (lo, hi)):
            raise SchemaError(path, "integer bounds beyond 15 digits are not supported")
        return self.add_rule(name, f"({_int_range(lo, hi)})")

    @staticmethod
    def _count(schema: Mapping[str, Any], key: str, path: str, default: int | None) -> Any:
        if key not in schema:
            return default
        v = schema[key]
        if not _is_int(v) or v < 0:
            raise SchemaError(_child(path, key), "must be a non-negative integer")
        if v > 10_000:
            raise SchemaError(_child(path, key), "values above 10000 are not supported")
        return v

    def _ref(self, ref: Any, path: str) -> str:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(path, f"only local references ('#/$defs/...') are supported, got {ref!r}")
        if ref in self._refs:
            return self._refs[ref]
        target = self._doc
        parts = [p.replace("~1", "/").replace("~0", "~") for p in ref[1:].split("/")[1:]] if ref != "#" else []
        for p in parts:
            if isinstance(target, Mapping) and p in target:
                target = target[p]
            elif isinstance(target, list) and p.isdigit() and int(p) < len(target):
                target = target[int(p)]
            else:
                raise SchemaError(path, f"unresolved reference {ref!r}")
        rule = self.add_rule("ref" + _RULE_NAME_RE.sub("-", ref[1:]), "__pending__")
        self._refs[ref] = rule
        body_rule = self._visit(target, f"{rule}-def", path)
        self._rules[rule] = body_rule
        return rule


def check_schema(schema: Any, path: str = "") -> None:
    """Raise ``SchemaError`` if ``schema`` cannot be enforced (the same checks as the conversion)."""
    GrammarBuilder().add_schema(schema, "root", path)


def schema_grammar(schema: Any) -> str:
    """The GBNF grammar (root rule ``root``) whose strings are exactly JSON documents valid against ``schema``."""
    b = GrammarBuilder()
    b.add_rule("root", b.add_schema(schema, "root-value"))
    return b.grammar()


def canonical(value: Any) -> str:
    """A stable key for a JSON value (the cache key of a schema)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


class GrammarCache:
    """Bounded LRU cache of generated GBNF by key (thread-safe), owned by an engine: ``schema(s)`` for JSON
    schemas, ``get(key, build)`` for other generated grammars (tool calls)."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._items: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def schema(self, schema: Any) -> str:
        return self.get("schema:" + canonical(schema), lambda: schema_grammar(schema))

    def get(self, key: str, build: Callable[[], str]) -> str:
        with self._lock:
            gbnf = self._items.get(key)
            if gbnf is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return gbnf
        gbnf = build()
        with self._lock:
            self.misses += 1
            self._items[key] = gbnf
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return gbnf

    def __len__(self) -> int:
        return len(self._items)


__all__ = [
    "GrammarBuilder",
    "GrammarCache",
    "SchemaError",
    "canonical",
    "check_schema",
    "gbnf_literal",
    "json_literal",
    "schema_grammar",
]
