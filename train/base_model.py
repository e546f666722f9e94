"""`edgellm models pull base`: a Hugging Face-format base model for training, built offline from the default GGUF.

transformers can read a GGUF (``from_pretrained(dir, gguf_file=...)``) and dequantizes it to float32, but the
loaded model stays flagged as GGUF-quantized and refuses ``save_pretrained``. So we build a clean model of the
same architecture from its config (minus ``quantization_config``), load the dequantized state dict into it and
save that, with the tokenizer and its chat template.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edgellm.catalog import get_entry
from edgellm.errors import EdgeLLMError
from edgellm.fsutil import atomic_path

log = logging.getLogger(__name__)


def dequantize_gguf(gguf: Path, dest: Path) -> None:
    """Write a float32 safetensors model + tokenizer at ``dest`` (a new folder) from a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    state = quantized.state_dict()
    del quantized

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied lm_head is rebuilt from the embedding, so it may be "missing" without harm.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise EdgeLLMError(
            f"{gguf.name}: state dict does not fit its config: missing {missing}, unexpected {unexpected}"
        )
    model.tie_weights()
    if getattr(model.config, "quantization_config", None) is not None:
        raise EdgeLLMError("the rebuilt model still carries a quantization_config")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    log.info(
        "wrote %s (%s, float32, %.1fM parameters)", dest, config.model_type, model.num_parameters() / 1e6
    )


def pull_base(dest: Path, models_dir: Path) -> None:
    """Catalog recipe for ``base``: dequantize the catalog's ``default`` GGUF into ``dest``, atomically."""
    gguf = get_entry("default").local_path(models_dir)
    if not gguf.is_file():
        raise EdgeLLMError(f"{gguf} is missing; run `edgellm models pull default` first")
    log.info("dequantizing %s into a Hugging Face model at %s", gguf.name, dest)
    with atomic_path(dest) as tmp:
        dequantize_gguf(gguf, tmp)
