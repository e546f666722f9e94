"""llama.cpp's quantizer in a process of its own: ``python -m edgellm.convert.quantize_worker < spec.json``.

`convert.llamacpp.quantize` starts it. llama.cpp reports per-tensor progress and k-quant fallbacks only through its
process-wide log callback; setting that callback in the process that converts would change it for everything else
there (a server, a benchmark, a test session). This process is ours alone, so it sets the callback and reports.

stdin: one JSON object ``{"src", "dst", "ftype", "nthread", "imatrix"}`` (``imatrix``: an ``.npz`` of GGUF tensor name
-> mean squared input activation per column, or null). stdout: JSON lines, ``{"event": "log", "text": ...}`` for each
line of llama.cpp's log, then ``{"event": "result", "code": <llama_model_quantize's return value>}``.
"""

from __future__ import annotations

import ctypes
import json
import sys
import threading
from typing import Any


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _imatrix_array(path: str) -> tuple[Any, list[Any]]:
    """A NULL-name-terminated ``llama_model_imatrix_data`` array, and the buffers that must outlive the call."""
    import llama_cpp
    import numpy as np

    with np.load(path) as npz:
        values = {name: np.ascontiguousarray(npz[name], dtype=np.float32) for name in npz.files}
    arr = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()
    keep: list[Any] = []
    for i, (name, data) in enumerate(sorted(values.items())):
        keep.append(data)
        arr[i].name = name.encode()
        arr[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = data.size
    arr[len(values)].name = None
    return ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data)), [arr, keep]


def run(spec: dict[str, Any]) -> int:
    import llama_cpp
    from llama_cpp import _logger

    pending: list[str] = []
    lock = threading.Lock()

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        chunk = text.decode("utf-8", errors="replace")
        with lock:
            pending.append(chunk)
            if chunk.endswith("\n"):
                _emit("log", text="".join(pending).rstrip("\n"))
                pending.clear()

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(spec["ftype"])
    params.nthread = int(spec.get("nthread") or 0)
    keep_alive = None
    if spec.get("imatrix"):
        params.imatrix, keep_alive = _imatrix_array(spec["imatrix"])
    rc = llama_cpp.llama_model_quantize(
        str(spec["src"]).encode(), str(spec["dst"]).encode(), ctypes.byref(params)
    )
    del keep_alive
    llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))  # before `callback` goes away
    with lock:
        if pending:
            _emit("log", text="".join(pending))
            pending.clear()
    return int(rc)


def main() -> int:
    code = run(json.loads(sys.stdin.read()))
    _emit("result", code=code)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
