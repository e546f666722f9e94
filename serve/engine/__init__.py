"""Generation engines: separate from HTTP, usable from Python without a server.

The public API of the engine, for the server and for other stages (bench)::

    from edgellm.serve.engine import ChatMessage, GenerationRequest, ModelSpec, SamplingParams, build_engine

    engine = build_engine("batched", [ModelSpec(name="m", path=Path("model.gguf"))], slots=4)
    generation = await engine.submit(GenerationRequest(model="m", messages=(ChatMessage("user", "Hi"),)))
    async for event in generation:  # TextDelta ..., then one Finished
        ...
    await engine.close()

Importing this package is cheap: it imports neither llama_cpp nor torch. ``BatchedEngine``, ``SerialEngine`` and
the reranker are imported on first use.

The pieces: ``base`` (the ``Engine`` protocol and the values that cross it), ``factory`` (kind + specs -> engine),
``pool`` (admission checks shared by the engines), ``serial`` (one request at a time per model, llama-cpp-python's
high-level API), ``batched`` (continuous batching on the low-level API), composed of ``context`` (the loaded model),
``slots`` (the slot table: KV bookkeeping and prefix reuse), ``batch`` (building a step's batch), ``sampling``
(llama.cpp sampler chains), ``detok`` (detokenization and stop strings) and ``scheduler`` (the one decoding
thread); ``prompt`` (chat templates), ``stream`` (the thread-to-event-loop bridge), ``rerank`` (the cross-encoder
reranker: llama.cpp GGUF or sentence-transformers), ``embed`` (embeddings), ``encoder`` (running a BERT-family GGUF
with llama.cpp's pooling), ``grammar`` / ``structured`` / ``tools`` (constrained output: JSON schema to GBNF, the
plan of a structured request, tool-call parsing).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from edgellm.serve.engine.base import (
    ChatMessage,
    ContextOverflowError,
    Engine,
    EngineError,
    EngineOverloadedError,
    EngineStats,
    EngineUnavailableError,
    Event,
    Finished,
    FinishReason,
    Generation,
    GenerationRequest,
    InvalidPromptError,
    ModelInfo,
    SamplingParams,
    SlotInfo,
    TextDelta,
    Timings,
    UnknownModelError,
)
from edgellm.serve.engine.factory import EngineKind, build_engine
from edgellm.serve.engine.prompt import ChatTemplate
from edgellm.serve.engine.specs import ModelSpec

if TYPE_CHECKING:
    from edgellm.serve.engine.batched import BatchedEngine
    from edgellm.serve.engine.embed import Embedder, EmbedOutput, GGUFEmbedder, load_embedder
    from edgellm.serve.engine.forced import (
        WHITESPACE,
        DraftVocab,
        ForcedDrafter,
        Gbnf,
        ModelHabits,
        Recognizer,
    )
    from edgellm.serve.engine.rerank import (
        CrossEncoderReranker,
        GGUFReranker,
        Reranker,
        RerankError,
        RerankInputError,
        RerankModelError,
        RerankOutput,
        RerankScore,
        load_reranker,
    )
    from edgellm.serve.engine.serial import SerialEngine
    from edgellm.serve.engine.speculative import DraftPolicy

_LAZY = {
    "BatchedEngine": "edgellm.serve.engine.batched",
    "SerialEngine": "edgellm.serve.engine.serial",
    "CrossEncoderReranker": "edgellm.serve.engine.rerank",
    "GGUFReranker": "edgellm.serve.engine.rerank",
    "Reranker": "edgellm.serve.engine.rerank",
    "load_reranker": "edgellm.serve.engine.rerank",
    "Embedder": "edgellm.serve.engine.embed",
    "EmbedOutput": "edgellm.serve.engine.embed",
    "GGUFEmbedder": "edgellm.serve.engine.embed",
    "load_embedder": "edgellm.serve.engine.embed",
    "RerankError": "edgellm.serve.engine.rerank",
    "RerankInputError": "edgellm.serve.engine.rerank",
    "RerankModelError": "edgellm.serve.engine.rerank",
    "RerankOutput": "edgellm.serve.engine.rerank",
    "RerankScore": "edgellm.serve.engine.rerank",
    # drafting (speculative decoding, jump-forward): for benchmarks that measure it with their own drafters
    "DraftPolicy": "edgellm.serve.engine.speculative",
    "DraftVocab": "edgellm.serve.engine.forced",
    "ForcedDrafter": "edgellm.serve.engine.forced",
    "Gbnf": "edgellm.serve.engine.forced",
    "ModelHabits": "edgellm.serve.engine.forced",
    "Recognizer": "edgellm.serve.engine.forced",
    "WHITESPACE": "edgellm.serve.engine.forced",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "BatchedEngine",
    "ChatMessage",
    "ChatTemplate",
    "ContextOverflowError",
    "CrossEncoderReranker",
    "DraftPolicy",
    "DraftVocab",
    "EmbedOutput",
    "Embedder",
    "Engine",
    "EngineError",
    "EngineKind",
    "EngineOverloadedError",
    "EngineStats",
    "EngineUnavailableError",
    "Event",
    "FinishReason",
    "ForcedDrafter",
    "GGUFEmbedder",
    "GGUFReranker",
    "Finished",
    "Gbnf",
    "Generation",
    "GenerationRequest",
    "InvalidPromptError",
    "ModelHabits",
    "ModelInfo",
    "ModelSpec",
    "Recognizer",
    "RerankError",
    "RerankInputError",
    "RerankModelError",
    "RerankOutput",
    "RerankScore",
    "Reranker",
    "SamplingParams",
    "SerialEngine",
    "SlotInfo",
    "TextDelta",
    "Timings",
    "UnknownModelError",
    "WHITESPACE",
    "build_engine",
    "load_embedder",
    "load_reranker",
]
