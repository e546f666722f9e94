"""Shared fixtures: the real default GGUF (pulled through the catalog), free loopback ports."""

from __future__ import annotations

import os
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
