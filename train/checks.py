"""`edgellm train check-data`: validate a recipe's datasets (or one JSONL file) exactly as a run would."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgellm.errors import EdgeLLMError
from edgellm.paths import resolve_input
from edgellm.train import data as D
from edgellm.train.config import DataSettings, load_train_config
from edgellm.train.modeling import base_model_dir, load_tokenizer

log = logging.getLogger(__name__)


def check_data(source: Path, overrides: Mapping[str, Any] | None = None) -> dict[str, D.DataReport]:
    """A recipe YAML -> one report per dataset, with its data settings and base tokenizer; a JSONL file -> one
    report with the default settings (the token limit is checked with the default base's tokenizer if present)."""
    source = resolve_input(source)
    if source.suffix in (".yaml", ".yml"):
        config = load_train_config(source, overrides)
        tokenizer = load_tokenizer(base_model_dir(config.base_model))
        paths, settings = [resolve_input(d.path) for d in config.datasets], config.data
    else:
        settings = DataSettings()
        paths = [source]
        try:
            tokenizer = load_tokenizer(base_model_dir("base"))
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
