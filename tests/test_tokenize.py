"""llama-server's /tokenize, /detokenize and /apply-template on a real `edgellm serve` with the default GGUF: the
request and response shapes of llama.cpp's tools/server (README "POST /tokenize"), ids as llama.cpp's own
tokenizer gives them, the chat template as transformers renders it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import running_server

MODEL = "smollm2-135m-instruct"
TEXT = "Hello world, ça va? 🦜 <|im_start|>"


@pytest.fixture(scope="module")
def server(default_gguf: Path) -> Iterator[httpx.Client]:
    with running_server(
        "--no-reranker", "--no-embedder", "--set", "models.0.n_ctx=512", "--set", "models.0.n_threads=1"
    ) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client


@pytest.fixture(scope="module")
def llama(default_gguf: Path):  # type: ignore[no-untyped-def]
    from llama_cpp import Llama

    llm = Llama(model_path=str(default_gguf), n_ctx=64, vocab_only=True, verbose=False)
    yield llm
    llm.close()


def tokens(server: httpx.Client, **body: object) -> list:  # type: ignore[type-arg]
    r = server.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"tokens"}
    return r.json()["tokens"]  # type: ignore[no-any-return]


def test_tokenize_defaults_and_flags_match_llama_cpp(server: httpx.Client, llama) -> None:  # type: ignore[no-untyped-def]
    b = TEXT.encode()
    # defaults as llama-server's: add_special false, parse_special true
    assert tokens(server, content=TEXT) == llama.tokenize(b, add_bos=False, special=True)
    assert tokens(server, content=TEXT, add_special=True) == llama.tokenize(b, add_bos=True, special=True)
    plain = tokens(server, content=TEXT, parse_special=False)
    assert plain == llama.tokenize(b, add_bos=False, special=False)
    assert 1 in tokens(server, content=TEXT) and 1 not in plain  # <|im_start|> is one token only when parsed
    assert tokens(server, content=["Hello", 905, " again"]) == [
        *llama.tokenize(b"Hello", add_bos=False, special=True), 905, *llama.tokenize(b" again", add_bos=False, special=True)
    ]
    assert tokens(server, content="", model=MODEL) == []


def test_pieces_are_text_or_bytes(server: httpx.Client) -> None:
    pieces = tokens(server, content=TEXT, with_pieces=True)
    assert all(set(p) == {"id", "piece"} for p in pieces)
    assert [p["id"] for p in pieces] == tokens(server, content=TEXT)
    # the parrot is split into byte tokens: those pieces are not valid UTF-8 alone and come as byte lists
    assert any(isinstance(p["piece"], list) for p in pieces)
    raw = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces)
    assert raw.decode() == TEXT


def test_detokenize_round_trips(server: httpx.Client) -> None:
    ids = tokens(server, content=TEXT)
    r = server.post("/detokenize", json={"tokens": ids})
    assert r.status_code == 200 and r.json() == {"content": TEXT}
    assert server.post("/detokenize", json={}).json() == {"content": ""}


@pytest.mark.parametrize("bad", [[49152], [-1], [1, 2, 10**18]])
def test_token_ids_outside_the_vocabulary_are_400(server: httpx.Client, bad: list[int]) -> None:
    for r in (server.post("/detokenize", json={"tokens": bad}), server.post("/tokenize", json={"content": ["a", *bad]})):
        assert r.status_code == 400, r.text
        assert "not in the vocabulary" in r.json()["error"]["message"]


def test_apply_template_is_the_chat_template_as_transformers_renders_it(server: httpx.Client) -> None:
    from transformers import AutoTokenizer

    from edgellm.catalog import pull

    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a colour."},
    ]
    r = server.post("/apply-template", json={"messages": messages})
    assert r.status_code == 200 and set(r.json()) == {"prompt"}
    reference = AutoTokenizer.from_pretrained(pull("base")).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert r.json()["prompt"] == reference


def test_bad_requests(server: httpx.Client) -> None:
    cases = [
        ("/tokenize", {"content": "x", "model": "nope"}, 404),
        ("/tokenize", {}, 400),
        ("/tokenize", {"content": "x", "add_special": "yes"}, 400),
        ("/tokenize", {"content": "x", "unknown_field": 1}, 400),  # no silent drops
        ("/detokenize", {"tokens": "1 2"}, 400),
        ("/apply-template", {"messages": []}, 400),
        ("/apply-template", {"messages": [{"role": "wizard", "content": "x"}]}, 400),
    ]
    for path, body, status in cases:
        r = server.post(path, json=body)
        assert r.status_code == status, (path, body, r.text)
        assert set(r.json()) == {"error"} and r.json()["error"]["code"] == status


def test_a_configured_chat_template_replaces_the_gguf_one(default_gguf: Path) -> None:
    """``models[].chat_template``: a Jinja file used instead of the GGUF's template (here Qwen 2.5's, whose default
    system prompt shows that it is the one rendered); a missing file is refused at start-up, naming it."""
    template = Path(__file__).parent / "assets" / "templates" / "Qwen-Qwen2.5-7B-Instruct.jinja"
    with running_server("--set", "models.0.n_ctx=512", "--no-reranker", "--no-embedder",
                        "--set", f"models.0.chat_template={template}") as url:
        r = httpx.post(f"{url}/apply-template", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["prompt"].startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    from edgellm.errors import ConfigError
    from edgellm.serve.settings import load_serve_settings

    with pytest.raises(ConfigError, match="nope.jinja does not exist"):
        load_serve_settings(None, {"models": [{"name": "m", "path": str(default_gguf), "chat_template": "nope.jinja"}]},
                            environ={})
