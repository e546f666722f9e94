"""Context sizes chosen for the machine (serve/sizing.py), on the real default GGUF's header, with the available
memory given; and a real server started with `--model` (no n_ctx) reporting the context it chose."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from edgellm.gguf import read_header
from edgellm.hardware import available_memory
from edgellm.serve.sizing import MEMORY_SHARE, kv_bytes_per_token, plan_contexts
from tests.servers import running_server

MB = 1_000_000


def test_kv_bytes_per_token_from_the_header(default_gguf: Path) -> None:
    # SmolLM2-135M: 30 layers x 3 KV heads x (64 + 64) values x 2 bytes
    assert kv_bytes_per_token(read_header(default_gguf, with_tensors=False).meta) == 30 * 3 * 128 * 2


def test_auto_context_is_the_trained_one_when_it_fits(default_gguf: Path) -> None:
    [plan] = plan_contexts([("m", default_gguf, None)], slots=4, available=16_000 * MB)
    assert plan.n_ctx == 8192 and plan.why == "the model's trained context"
    assert plan.kv_bytes == 4 * 8192 * 23040


def test_auto_context_is_halved_until_the_kv_fits(default_gguf: Path) -> None:
    weights = default_gguf.stat().st_size
    room = 250 * MB  # 4 slots x 2048 tokens (189 MB) fit, 4096 (377 MB) do not
    [plan] = plan_contexts([("m", default_gguf, None)], slots=4, available=int((weights + room) / MEMORY_SHARE) + 1)
    assert plan.n_ctx == 2048 and "halved" in plan.why
    assert plan.kv_bytes <= room


def test_an_explicit_context_is_kept_with_a_warning(default_gguf: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="edgellm.serve.sizing"):
        [plan] = plan_contexts([("m", default_gguf, 4096)], slots=4, available=200 * MB)
    assert plan.n_ctx == 4096 and plan.why == "configured"
    assert "set n_ctx: null" in caplog.text


def test_available_memory_is_plausible() -> None:
    assert 64 * MB < available_memory() < 2**50


def test_a_server_sizes_a_model_given_by_path(default_gguf: Path) -> None:
    with running_server("--model", str(default_gguf), "--no-reranker", "--no-embedder", "--set", "slots=2") as url:
        [model] = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
    expected = plan_contexts([("m", default_gguf, None)], slots=2)[0].n_ctx
    assert model["meta"]["n_ctx"] == expected >= 512
