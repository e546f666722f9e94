"""`edgellm train check-data`: validate a recipe's datasets (or one JSONL file) exactly as a run would."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgellm.errors import EdgeLLMError
from edgellm.train import data as D
from edgellm.train.config import DataSettings, load_train_config, resolve_path
from edgellm.train.modeling import load_tokenizer, resolve_base_model

log = logging.getLogger(__name__)


def check_data(source: Path, overrides: Mapping[str, Any] | None = None) -> dict[str, D.DataReport]:
    """A recipe YAML -> one report per dataset, with its data settings and base tokenizer; a JSONL file -> one
    report with the default settings (the token limit is checked with the default base's tokenizer if present)."""
    if source.suffix in (".yaml", ".yml"):
        config = load_train_config(source, overrides)
        tokenizer = load_tokenizer(resolve_base_model(config.base_model))
        paths, settings = [resolve_path(d.path) for d in config.datasets], config.data
    else:
        settings = DataSettings()
        paths = [source]
        try:
            tokenizer = load_tokenizer(resolve_base_model("base"))
        except EdgeLLMError as e:
            log.warning("not checking token lengths: %s", e)
            tokenizer = None
    return {
        str(path): D.read_examples(
            path,
            fmt=settings.format,
            max_tokens=settings.max_tokens if tokenizer is not None else None,
            count_tokens=D.token_counter(tokenizer) if tokenizer is not None else None,
            forbidden_phrases=settings.forbidden_phrases,
        )
        for path in paths
    }
