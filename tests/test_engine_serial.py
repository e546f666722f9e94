"""The serial engine against the real default GGUF, at engine level (the HTTP endpoints run on it in
tests/test_server_real.py)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from edgellm.serve.engine.base import ChatMessage, Finished, GenerationRequest, SamplingParams, TextDelta
from edgellm.serve.engine.serial import SerialEngine
from edgellm.serve.engine.specs import ModelSpec


def test_models_of_one_engine_decode_on_one_thread(default_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two models: every llama_decode runs on the engine's one decoder thread (a thread per model meant two OpenMP
    teams and ~3x slower decoding on 2 cores), and each model answers as it does alone."""
    import llama_cpp.llama_cpp as llama_cpp  # the bindings module llama-cpp-python's Llama calls through

    callers: set[str] = set()
    real_decode = llama_cpp.llama_decode

    def decode(ctx, batch):  # type: ignore[no-untyped-def]
        callers.add(threading.current_thread().name)
        return real_decode(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", decode)
    specs = [ModelSpec(name=n, path=default_gguf, n_ctx=512, n_threads=2) for n in ("first", "second")]
    engine = SerialEngine(specs)

    async def answer(model: str) -> str:
        request = GenerationRequest(
            model=model,
            messages=(ChatMessage("user", "Name three colors."),),
            params=SamplingParams(max_tokens=12, temperature=0.0),
        )
        gen = await engine.submit(request)
        text = ""
        async for event in gen:
            if isinstance(event, TextDelta):
                text += event.text
            else:
                assert isinstance(event, Finished) and event.completion_tokens > 0
        return text

    async def main() -> None:
        alone = await answer("first")
        assert alone
        assert await asyncio.gather(answer("first"), answer("second")) == [alone, alone]

    try:
        asyncio.run(main())
    finally:
        asyncio.run(engine.close())
    assert len(callers) == 1 and next(iter(callers)).startswith("serial-decoder"), callers
