"""Server settings: one validated YAML (configs/serve.yaml), every key overridable by CLI flag and by
``EDGELLM_SERVE__<KEY>`` environment variables (``__`` for nesting: ``EDGELLM_SERVE__MODELS__0__N_CTX=2048``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgellm.config import load_config
from edgellm.manifest import PersonaProfile
from edgellm.serve.engine.batch import PROMPT_CHUNK
from edgellm.serve.engine.embed import EmbedBackend
from edgellm.serve.engine.factory import EngineKind
from edgellm.serve.engine.rerank import RerankBackend, backend_for
from edgellm.serve.engine.speculative import DraftPolicy

ENV_PREFIX = "EDGELLM_SERVE"

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(_Strict):
    """One GGUF model served under ``name``."""

    name: str = Field(min_length=1)
    path: Path
    n_ctx: int | None = Field(
        None, ge=64, description="context size per request in tokens; null: the model's trained context, halved "
        "until every slot's KV cache fits in the memory left after the weights (logged at start)"
    )
    n_threads: int | None = Field(None, ge=1, description="generation threads; default: the physical cores")
    n_gpu_layers: int = Field(0, ge=-1, description="layers offloaded to a GPU build of llama.cpp (-1: all)")
    n_batch: int = Field(512, ge=1, description="prompt-processing chunk size")
    chat_template: Path | None = Field(
        None, description="a Jinja chat template file used instead of the one in the GGUF (a model whose file "
        "carries none, or a wrong one)"
    )

    @field_validator("chat_template")
    @classmethod
    def _template_readable(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"chat template file {path} does not exist")
        return path


class ModelDefaults(_Strict):
    """What the models found in ``models_dir`` are served with (each file has no settings of its own)."""

    n_ctx: int | None = Field(
        None, ge=64, description="context size per request; null: sized to the memory left when the model loads"
    )
    n_threads: int | None = Field(None, ge=1, description="generation threads; default: the physical cores")
    n_gpu_layers: int = Field(0, ge=-1)
    n_batch: int = Field(512, ge=1)


class RerankerSettings(_Strict):
    """A cross-encoder for /v1/rerank: a GGUF made by `edgellm convert` (backend llama.cpp, no torch) or a
    sentence-transformers CrossEncoder directory (backend sentence-transformers)."""

    name: str = Field("reranker", min_length=1)
    path: Path
    backend: RerankBackend | None = Field(
        None, description="llama.cpp or sentence-transformers; null: llama.cpp for a .gguf file, else sentence-transformers"
    )
    max_documents: int = Field(1000, ge=1)
    batch_size: int = Field(32, ge=1, description="sentence-transformers: pairs per forward pass")
    n_batch: int = Field(512, ge=64, description="llama.cpp: tokens per llama_decode (many pairs in one)")
    max_length: int | None = Field(None, ge=8)
    truncate: bool = True
    max_waiting: int = Field(
        16, ge=0, description="requests allowed to wait while one is reranked; beyond it: 503 with Retry-After"
    )
    threads: int | None = Field(
        1,
        ge=1,
        description="threads for reranking: llama.cpp's for a GGUF; torch's for sentence-transformers, set process-wide "
        "by the server when it loads the reranker (null: torch's default). torch and llama.cpp share one OpenMP runtime "
        "in this process: more OpenMP threads than cores makes it throttle, and chat decoding drops ~3x",
    )

    @model_validator(mode="after")
    def _backend_fits_path(self) -> RerankerSettings:
        if self.backend == "llama.cpp" and self.path.suffix != ".gguf":
            raise ValueError(f"backend llama.cpp needs a .gguf file, got {self.path}")
        if self.backend == "sentence-transformers" and self.path.suffix == ".gguf":
            raise ValueError(f"backend sentence-transformers needs a model directory, got the GGUF {self.path}")
        return self

    def resolved_backend(self) -> RerankBackend:
        return self.backend or backend_for(self.path)


class EmbedderSettings(_Strict):
    """An embedding model for /v1/embeddings: a GGUF (backend llama.cpp, no torch; all-MiniLM-L6-v2 converted by
    `edgellm models pull embedder`) or a sentence-transformers directory (backend sentence-transformers)."""

    name: str = Field("embedder", min_length=1)
    path: Path
    backend: EmbedBackend | None = Field(
        None, description="llama.cpp or sentence-transformers; null: llama.cpp for a .gguf file, else sentence-transformers"
    )
    max_inputs: int = Field(2048, ge=1, description="inputs allowed in one request")
    max_length: int | None = Field(None, ge=8, description="tokens per input; null: the model's trained positions")
    truncate: bool = Field(True, description="cut longer inputs to max_length (false: 400 exceed_context_size_error)")
    normalize: bool = Field(True, description="L2-normalize the vectors (as sentence-transformers' Normalize)")
    pooling: Literal["mean", "cls", "last"] | None = Field(None, description="null: the pooling the GGUF records")
    n_batch: int = Field(512, ge=64, description="llama.cpp: tokens per llama_decode (many inputs in one)")
    batch_size: int = Field(32, ge=1, description="sentence-transformers: inputs per forward pass")
    max_waiting: int = Field(
        16, ge=0, description="requests allowed to wait while one is embedded; beyond it: 503 with Retry-After"
    )
    threads: int = Field(
        1,
        ge=1,
        description="llama.cpp threads (more than 1 starts a second OpenMP team beside chat decoding); torch's for "
        "sentence-transformers, set process-wide when it loads",
    )

    @model_validator(mode="after")
    def _backend_fits_path(self) -> EmbedderSettings:
        if self.backend == "llama.cpp" and self.path.suffix != ".gguf":
            raise ValueError(f"backend llama.cpp needs a .gguf file, got {self.path}")
        if self.backend == "sentence-transformers" and self.path.suffix == ".gguf":
            raise ValueError(f"backend sentence-transformers needs a model directory, got the GGUF {self.path}")
        return self

    def resolved_backend(self) -> EmbedBackend:
        return self.backend or ("llama.cpp" if self.path.suffix == ".gguf" else "sentence-transformers")


class LoraSettings(_Strict):
    """A GGUF LoRA adapter (made by `edgellm convert --lora`) applied at run time on its persona's base model."""

    path: Path
    scale: float = Field(1.0, ge=-4.0, le=4.0, description="the adapter's weight (1: as trained)")

    @field_validator("path")
    @classmethod
    def _adapter_readable(cls, path: Path) -> Path:
        if not path.is_file():
            raise ValueError(f"LoRA adapter file {path} does not exist")
        return path


class PersonaSettings(PersonaProfile):
    """A persona: a model under ``models`` with LoRA adapters applied at run time (one copy of the base weights
    however many personas share it), and its profile (``edgellm.manifest.PersonaProfile``: system prompt, caps,
    forbidden phrases, triggers, description; the same fields a train recipe records). Clients select it as
    ``model: "<name>"``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    base: str = Field(min_length=1, description="the name of a model under `models` the adapters apply to")
    adapters: list[LoraSettings] = Field(
        default_factory=list, description="LoRA adapters applied together (empty: the base with this profile)"
    )

    @field_validator("adapters")
    @classmethod
    def _distinct_adapters(cls, adapters: list[LoraSettings]) -> list[LoraSettings]:
        files = [a.path.resolve() for a in adapters]
        if len(set(files)) != len(files):
            raise ValueError("an adapter file is listed twice; give it once, with the sum of the scales")
        return adapters


class RouterSettings(_Strict):
    """A model name (``auto`` by default) that picks a persona for each request's last user message, without an
    LLM call, and says why (scores per persona)."""

    name: str = Field("auto", min_length=1)
    personas: list[str] | None = Field(None, description="the personas it chooses from (null: all)")
    default: str = Field(description="the persona chosen when no score reaches the threshold")
    threshold: float | None = Field(
        None,
        ge=0.0,
        description="the least score a persona needs to be chosen; null: the method's own (keywords 1: one trigger "
        "word; embeddings 0.15: cosine similarity; hybrid 1), see edgellm/routing.py",
    )
    method: Literal["keywords", "embeddings", "hybrid"] = Field(
        "keywords",
        description="keywords: trigger matches (< 1 ms); embeddings: similarity to each description with the "
        "configured embedder; hybrid: both",
    )


class ThrottleSettings(_Strict):
    """Throttling on a laptop (off by default; needs psutil): while the machine runs on battery, or while the rest
    of the machine (every process but this server) uses more than ``cpu_percent`` of the CPU, each loaded model of
    the batched engine decodes with ``threads`` threads and admits new requests into at most ``slots`` slots;
    checked every ``interval`` seconds, restored when the condition ends."""

    enabled: bool = False
    on_battery: bool = Field(True, description="throttle while the machine runs on battery")
    cpu_percent: float | None = Field(
        None, gt=0, le=100, description="throttle while the other processes use more than this share of the CPU "
        "(percent of all cores); null: CPU use never throttles"
    )
    threads: int = Field(1, ge=1, description="decoding threads per model while throttled")
    slots: int = Field(1, ge=1, description="slots new requests may fill per model while throttled")
    interval: float = Field(5.0, ge=0.1, le=3600, description="seconds between checks")


class DraftSettings(_Strict):
    """Speculative decoding from the context in the batched engine (serve/engine/speculative.py): each stream drafts
    up to ``n_max`` tokens copied from its prompt and output, verified in the step's batch; greedy output unchanged
    (up to llama.cpp's rounding at near ties), sampled output keeps its distribution. ``jump_forward``: under a
    grammar, draft the text it forces next (serve/engine/forced.py; the request's own grammar and output only).
    ``jump_forward_learned``: also propose the text it forced in earlier answers under the same grammar (shared
    across clients: its speed can reveal whether another client's answer went the same way: off by default, keep it
    off between untrusted tenants). ``jump_forward_spellings``: draft forced text (keys, brackets) in the tokens the
    model wrote it in before (remembered per model: an answer's speed can show that the same schema keys were
    written before, as prefix reuse shows a prompt was). ``shared``: also draft from the model's earlier requests, prompts and answers
    (llama-server's ``ngram-mod``; the same caution: off by default)."""

    enabled: bool = Field(True, description="draft tokens from the context and verify them in one batch")
    n_max: int = Field(8, ge=1, le=64, description="most draft tokens per stream and step")
    ngram_max: int = Field(4, ge=1, le=16, description="longest n-gram matched against the context")
    ngram_min: int = Field(2, ge=1, le=16, description="shortest n-gram matched against the context")
    jump_forward: bool = Field(
        True, description="under a grammar (JSON schema, JSON mode, tool calls), draft the text it forces next"
    )
    jump_forward_learned: bool = Field(
        False, description="under a grammar, also draft the text it forced in earlier answers under the same grammar "
        "(shared by all clients using it)"
    )
    jump_forward_spellings: bool = Field(
        True, description="under a grammar, draft forced text (keys, brackets; never values) in the tokens the model "
        "wrote it in before rather than the tokenizer's (remembered per model, shared by all clients)"
    )
    shared: bool = Field(
        False, description="also draft from the prompts and answers of the model's earlier requests (shared by all "
        "clients: its speed can reveal whether another client's text went the same way)"
    )
    cost_aware: bool = Field(
        True,
        description="draft a token only when its acceptance repays the measured cost of a batch row; "
        "false: draft whatever matches (for measurements)",
    )

    def policy(self) -> DraftPolicy | None:
        """The engine's drafting policy (None: drafting off)."""
        if not self.enabled:
            return None
        return DraftPolicy(
            self.n_max,
            self.ngram_max,
            self.ngram_min,
            self.jump_forward,
            self.cost_aware,
            self.shared,
            self.jump_forward_learned,
            self.jump_forward_spellings,
        )

    @model_validator(mode="after")
    def _ngram_order(self) -> DraftSettings:
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"draft.ngram_min ({self.ngram_min}) must not exceed draft.ngram_max ({self.ngram_max})")
        return self


class ServeSettings(_Strict):
    draft: DraftSettings = Field(default_factory=lambda: DraftSettings.model_validate({}))
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    engine: EngineKind = Field(
        "batched", description="batched: continuous batching (default); serial: one request at a time per model"
    )
    slots: int = Field(4, ge=1, le=64, description="batched engine: sequences decoded together per model")
    prompt_chunk: int = Field(
        PROMPT_CHUNK,
        ge=16,
        le=8192,
        description="batched engine: prompt tokens read per step while other streams generate (larger: more "
        "throughput with long prompts, longer pauses in the other streams)",
    )
    kv_unified: bool = Field(
        False,
        description="batched engine: one KV buffer shared by the slots (llama-server's -kvu) instead of one per "
        "slot; uneven batches (drafts beside streams that do not draft) then take one pass, but a greedy answer may "
        "depend on what else is in the batch",
    )
    queue_size: int = Field(64, ge=0, description="requests allowed to wait per model; beyond it: 503")
    models: list[ModelSettings] = Field(
        default_factory=list, description="models loaded at start and kept loaded (may be empty with models_dir)"
    )
    models_dir: Path | None = Field(
        None, description="a folder whose GGUF files and convert manifests are served too, loaded on first request"
    )
    model_defaults: ModelDefaults = Field(default_factory=lambda: ModelDefaults.model_validate({}))
    max_loaded_models: int = Field(
        2, ge=1, description="models from models_dir loaded at once; loading one more unloads the least recently used"
    )
    keep_alive: float = Field(
        300.0, description="seconds a model from models_dir may stay idle before it is unloaded (negative: forever)"
    )
    load_timeout: float = Field(
        120.0, gt=0, description="seconds a request waits for its model to load; beyond it: 503 with Retry-After"
    )
    memory_budget: int | str | None = Field(
        None, description="RAM the models may take together (bytes, a size such as '6GB', or a share of the memory "
        "available at start such as '75%'; null: no budget): loading a model from models_dir unloads the least "
        "recently used idle ones until the estimates (file + KV cache) fit"
    )
    throttle: ThrottleSettings = Field(default_factory=lambda: ThrottleSettings.model_validate({}))
    max_tokens_cap: int = Field(2048, ge=1, description="upper bound on a request's max_tokens")
    default_max_tokens: int = Field(512, ge=1, description="max_tokens when a request gives none")
    max_n: int = Field(8, ge=1, le=64, description="largest `n` (choices per request) accepted")
    shutdown_timeout: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="on SIGTERM/SIGINT: seconds in-flight requests may run on before they are ended (streams with a "
        "final chunk, finish_reason 'length'); give the container's stop grace period more than this",
    )
    max_body_bytes: int = Field(1_000_000, ge=1024, description="largest request body accepted (413 beyond)")
    api_key: str | None = Field(None, description="if set, requests need 'Authorization: Bearer <key>'")
    cors_origins: list[str] = Field(default_factory=list, description="browser origins allowed (no credentials)")
    personas: list[PersonaSettings] = Field(
        default_factory=list, description="LoRA personas on the models above, served as models of their own"
    )
    routers: list[RouterSettings] = Field(default_factory=list, description="model names that route to a persona")
    reranker: RerankerSettings | None = None
    embedder: EmbedderSettings | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelSettings]) -> list[ModelSettings]:
        names = [m.name for m in models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dupes)}")
        return models

    @field_validator("memory_budget")
    @classmethod
    def _budget_readable(cls, value: int | str | None) -> int | str | None:
        from edgellm.serve.sizing import parse_memory_budget

        parse_memory_budget(value, available=1)  # the syntax; a share is resolved against the memory at start
        return value

    @model_validator(mode="after")
    def _some_models(self) -> ServeSettings:
        if not self.models and self.models_dir is None:
            raise ValueError("no models: list some under `models` or serve a folder of them with `models_dir`")
        if self.models_dir is not None and not self.models_dir.is_dir():
            raise ValueError(f"models_dir {self.models_dir} is not a folder")
        return self

    @model_validator(mode="after")
    def _personas_fit(self) -> ServeSettings:
        models = {m.name for m in self.models}
        names = [p.name for p in self.personas] + [r.name for r in self.routers]
        dupes = sorted({n for n in names if names.count(n) > 1} | (set(names) & models))
        if dupes:
            raise ValueError(f"persona and router names must be unique and differ from model names: {', '.join(dupes)}")
        personas = {p.name for p in self.personas}
        if self.personas and self.engine != "batched":
            raise ValueError("personas need the batched engine (LoRA adapters at run time); set engine: batched")
        for p in self.personas:
            if p.base not in models:
                raise ValueError(f"persona {p.name!r}: base {p.base!r} is not a model under `models` ({sorted(models)})")
        for r in self.routers:
            chosen = set(r.personas if r.personas is not None else personas)
            unknown = sorted((chosen | {r.default}) - personas)
            if unknown:
                raise ValueError(f"router {r.name!r}: no persona named {', '.join(map(repr, unknown))}")
            if r.default not in chosen:
                raise ValueError(f"router {r.name!r}: its default {r.default!r} is not among its personas")
            if r.method != "keywords" and self.embedder is None:
                raise ValueError(f"router {r.name!r}: method {r.method!r} needs an `embedder`")
        return self

    @model_validator(mode="after")
    def _default_within_cap(self) -> ServeSettings:
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_cap ({self.max_tokens_cap})"
            )
        return self


def load_serve_settings(
    path: Path | None, overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None
) -> ServeSettings:
    return load_config(ServeSettings, path, overrides, env_prefix=ENV_PREFIX, environ=environ)


def models_from_paths(paths: list[Path], template: ModelSettings | None = None) -> list[dict[str, Any]]:
    """``--model PATH`` values: a GGUF file becomes a model named after the file; a convert manifest.json (or
    its folder) contributes every variant in it, named ``<name>:<quant>``."""
    base = template.model_dump(exclude={"name", "path"}) if template else {}
    out: list[dict[str, Any]] = []
    for p in paths:
        p = Path(p)
        if p.name.endswith(".json") or p.is_dir():
            from edgellm.manifest import load_manifest

            manifest = load_manifest(p)
            manifest.check_files()
            for f in manifest.files:
                out.append({**base, "name": manifest.model_id(f), "path": str(f.absolute_path)})
        else:
            out.append({**base, "name": p.stem, "path": str(p)})
    return out


# llama.cpp architectures that are encoders (embeddings, rerankers): no chat, no KV cache.
ENCODER_ARCHITECTURES = frozenset(
    {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "modern-bert", "neo-bert", "t5encoder"}
)


class ModelsDir:
    """The chat models in a folder (``models_dir``), rescanned on each ``scan()``: every GGUF file (named after the
    file) and every convert manifest.json (its variants, ``<name>:<quant>``; the GGUFs beside a manifest are not
    listed again). Encoder GGUFs (embedding and reranker models) and files not (yet) readable as GGUF are skipped.
    Headers are read once per file version (path, size, mtime)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._chat: dict[tuple[str, int, int], bool] = {}

    def _is_chat(self, path: Path) -> bool:
        from edgellm.gguf import read_header

        try:
            st = path.stat()
        except OSError:
            return False
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._chat:
            try:
                header = read_header(path, with_tensors=False)
            except Exception as e:  # a partial copy, or not a GGUF: seen again on the next scan
                log.debug("models_dir: skipping %s: %s", path, e)
                return False
            arch = header.architecture
            chat = bool(arch) and arch not in ENCODER_ARCHITECTURES and f"{arch}.pooling_type" not in header.meta
            if not chat:
                log.info("models_dir: %s is an encoder (%s), not a chat model: skipped", path, arch)
            self._chat[key] = chat
        return self._chat[key]

    def scan(self) -> list[tuple[str, Path]]:
        """(name, GGUF path) of every chat model in the folder, sorted by name; the first of a repeated name wins."""
        found: dict[str, Path] = {}
        manifest_dirs: set[Path] = set()
        for root, dirs, files in os.walk(self.folder, followlinks=True):
            dirs.sort()
            if "manifest.json" in files:
                manifest_dirs.add(Path(root))
                try:
                    for entry in models_from_paths([Path(root) / "manifest.json"]):
                        found.setdefault(entry["name"], Path(entry["path"]))
                except Exception as e:
                    log.warning("models_dir: skipping the manifest in %s: %s", root, e)
        for root, _dirs, files in os.walk(self.folder, followlinks=True):
            if Path(root) in manifest_dirs:
                continue
            for f in sorted(files):
                if f.endswith(".gguf"):
                    path = Path(root) / f
                    name = path.stem
                    if name in found and found[name] != path:
                        log.warning("models_dir: %s and %s are both named %r; serving the first", found[name], path,
                                    name)
                    found.setdefault(name, path)
        return sorted((n, p) for n, p in found.items() if self._is_chat(p))
