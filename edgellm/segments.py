"""The token-type rows of a BERT-family GGUF, for feeding segment ids that llama.cpp's batch cannot carry: shared
by convert's verification runner (``convert/encoder_runner.py``) and serving's encoder (``serve/engine/encoder.py``).

llama.cpp's BERT graph adds row 0 of ``token_types`` to every position. A cross-encoder is trained with segment 1
on the document, so when the type rows differ a sequence with segment ids goes in as input embeddings,
``token_embd[id] + token_types[segment] - token_types[0]`` (llama.cpp still adds row 0 and the positions): what
Hugging Face computes. The tensors are read with gguf-py (memory-mapped when 16/32-bit; dequantized once if
quantized).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Segments:
    """Input embeddings for segment ids: token rows and ``token_types[s] - token_types[0]`` for each segment s."""

    token_rows: Any  # np.ndarray [n_vocab, n_embd], float16 or float32 (memory-mapped when the file is 16/32-bit)
    type_delta: Any  # np.ndarray [n_types, n_embd], float32

    def embed(self, tokens: Sequence[int], segments: Sequence[int], out: Any) -> None:
        """Write the input embeddings of ``tokens`` into ``out`` ([len(tokens), n_embd] float32)."""
        np.copyto(out, self.token_rows[np.asarray(tokens)], casting="unsafe")
        out += self.type_delta[np.asarray(segments)]


def read_segments(path: Path) -> Segments | None:
    """The token and token-type tensors of a BERT GGUF when its type rows differ (else None: all-zero segment ids
    are exact)."""
    from gguf import GGUFReader
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    types, tokens = tensors.get("token_types.weight"), tensors.get("token_embd.weight")
    if types is None or tokens is None:
        return None

    def rows(t: Any) -> Any:
        n_embd = int(t.shape[0])
        if t.tensor_type in (GGMLQuantizationType.F16, GGMLQuantizationType.F32):
            return np.asarray(t.data).reshape(-1, n_embd)
        return dequantize(t.data, t.tensor_type).reshape(-1, n_embd).astype(np.float32)

    type_rows = np.asarray(rows(types), dtype=np.float32)
    if len(type_rows) < 2 or np.array_equal(type_rows[1:], np.broadcast_to(type_rows[0], type_rows[1:].shape)):
        return None
    return Segments(token_rows=rows(tokens), type_delta=type_rows - type_rows[0])


__all__ = ["Segments", "read_segments"]
