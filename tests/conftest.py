"""Shared fixtures: the real default GGUF (pulled through the catalog), free loopback ports."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgellm.launch import free_port

__all__ = ["free_port"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The real default model file (`edgellm models pull default` runs in `make setup`)."""
    from edgellm.catalog import pull

    return pull("default")


@pytest.fixture(scope="session")
def chat_server(default_gguf: Path) -> Iterator[str]:
    """One real `edgellm serve` (batched engine, the default GGUF, n_ctx 1024, no reranker or embedder) shared by the
    modules that test the chat API over HTTP (logit bias, logprobs, n choices, tools, structured output, bench serve),
    which each started this same server of their own. Started on first use, stopped at the end of the session."""
    from tests.servers import running_server

    with running_server("--engine", "batched", "--set", "models.0.n_ctx=1024", "--no-reranker", "--no-embedder") as url:
        yield url


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide random Llama with the real SmolLM2 tokenizer and chat template (built once per session)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from edgellm.catalog import pull

    tokenizer = AutoTokenizer.from_pretrained(pull("base"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three GGUF LoRA adapters for the default model's base, made by llama.cpp's own ``convert_lora_to_gguf.py``
    from PEFT adapters with random A and B (no training: seconds, and each one visibly changes greedy answers).
    Built once per session; the personas' trained adapters come from `make personas`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from edgellm.catalog import pull
    from edgellm.convert.llamacpp import require_converter, run_lora_converter

    base = pull("base")
    converter = require_converter()
    out = tmp_path_factory.mktemp("smollm2-adapters")
    paths = []
    for i in range(3):
        torch.manual_seed(100 + i)
        model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
        config = LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights=False
        )
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.5)
        peft_model.save_pretrained(out / f"adapter{i}")
        run_lora_converter(converter, out / f"adapter{i}", base, out / f"adapter{i}.gguf")
        paths.append(out / f"adapter{i}.gguf")
    return paths
