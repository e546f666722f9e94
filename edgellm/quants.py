"""Quantization type names: the one place that maps the names people type (``q4_k_m``) to llama.cpp's
``llama_ftype`` values and back, read from llama.cpp's own constants (``LLAMA_FTYPE_MOSTLY_*`` in llama.h, as
llama-cpp-python exposes them), so that a type llama.cpp adds appears here without an edit.

    ftypes()["q4_k_m"]      # 15
    ftype_name(15)          # "Q4_K_M"
    quant_in_name(Path("demo-q4_k_m.gguf"))   # "Q4_K_M"
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

# Types made by llama.cpp's converter (convert_hf_to_gguf.py --outtype) rather than its quantizer.
FLOAT_TYPES = ("F32", "BF16", "F16")
# What `edgellm convert` makes when no --quant is given.
DEFAULT_QUANTS = ("q4_k_m", "q8_0")

_NAME_QUANT = re.compile(r"(?i)(?:^|[-_.])(f32|bf16|f16|iq\d\w*|tq\d_\d|mxfp4\w*|q\d(?:_[a-z0-9]+)*)$")


@functools.cache
def ftypes() -> dict[str, int]:
    """Every quantizable ``llama_ftype`` by lower-case name (``q4_k_m``, ``q8_0``, ``f16``, ...).

    ``LLAMA_FTYPE_ALL_F32`` is ``f32``; guessed and deprecated values (``GUESSED``, removed Q4_1_F16 kinds) are
    left out. Imports llama_cpp on first use.
    """
    import llama_cpp

    out: dict[str, int] = {}
    for key, value in vars(llama_cpp).items():
        if not key.startswith("LLAMA_FTYPE_") or not isinstance(value, int) or key == "LLAMA_FTYPE_GUESSED":
            continue
        name = key.removeprefix("LLAMA_FTYPE_").removeprefix("MOSTLY_").removeprefix("ALL_").lower()
        if "_f16" in name and name != "f16":  # Q4_1_SOME_F16: a mixed type llama.cpp no longer makes
            continue
        out[name] = value
    return out


def ftype_name(ftype: int) -> str | None:
    """A ``llama_ftype`` value as llama.cpp's upper-case type name (``Q4_K_M``), or None if unknown."""
    for name, value in ftypes().items():
        if value == ftype:
            return name.upper()
    return None


def quant_in_name(path: Path) -> str | None:
    """The quant suffix of a file name (``demo-q4_k_m.gguf`` -> ``Q4_K_M``), or None."""
    m = _NAME_QUANT.search(Path(path).stem)
    return m.group(1).upper() if m else None
