"""Personas: LoRA adapters on a shared base model, each with a system prompt, caps and a phrase filter, chosen by
``model: "<persona>"`` or routed by ``model: "auto"``. The layer between the HTTP routes and the engine; no I/O
except reading an adapter manifest, no llama.cpp::

    personas = PersonaSet.from_settings(settings)
    ModelSpec(name=base, path=..., loras=personas.loras_for(base))         # load each base with its adapters
    router = build_router(settings.routers[0], personas, embedder)          # model "auto"
    decision = router.route(routing_text(request))                         # (in a worker thread if router.blocking)
    request = personas.apply(decision.persona, request)                     # what the engine runs

`PersonaSet.apply` turns a request for a persona into a request for its base: ``model`` the base, ``lora`` the
persona's adapters (indexes into ``loras_for(base)``), its system prompt before the conversation, ``max_tokens``
capped, and ``SamplingParams.max_words`` / ``forbidden_phrases`` set for the engine's per-choice text filters
(``serve/engine/textfilters.py``).

The routing itself (`Router`, `RouteDecision`, the score formulas) lives in `edgellm.routing` so that `bench` can
measure it without importing `serve`; it is re-exported here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgellm.manifest import load_adapter_manifest
from edgellm.routing import RouteDecision, RouteProfile, Router, RoutingError, TextEmbedder
from edgellm.serve.engine.base import ChatMessage, GenerationRequest, UnknownModelError

if TYPE_CHECKING:
    from edgellm.serve.settings import PersonaSettings, RouterSettings, ServeSettings

log = logging.getLogger(__name__)

__all__ = [
    "Persona",
    "PersonaSet",
    "RouteDecision",
    "RouteProfile",
    "Router",
    "RoutingError",
    "build_router",
    "default_router",
    "base_model_from_adapters",
    "personas_from_adapters",
    "routing_text",
    "with_system_prompt",
]

SYSTEM_ROLES = ("system", "developer")


@dataclass(frozen=True)
class Persona:
    """A persona, resolved: its base model's name, its adapter files (absolute) with their scales, its profile."""

    name: str
    base: str
    adapters: tuple[tuple[Path, float], ...] = ()
    system_prompt: str | None = None
    max_tokens: int | None = None
    max_words: int | None = None
    forbidden_phrases: tuple[str, ...] = ()
    triggers: tuple[str, ...] = ()
    description: str | None = None

    @classmethod
    def from_settings(cls, settings: PersonaSettings) -> Persona:
        return cls(
            name=settings.name,
            base=settings.base,
            adapters=tuple((Path(a.path).resolve(), a.scale) for a in settings.adapters),
            system_prompt=settings.system_prompt,
            max_tokens=settings.max_tokens,
            max_words=settings.max_words,
            forbidden_phrases=tuple(settings.forbidden_phrases),
            triggers=tuple(settings.triggers),
            description=settings.description,
        )

    def route_profile(self) -> RouteProfile:
        return RouteProfile(self.name, self.triggers, self.description)


class PersonaSet:
    """The configured personas, in configuration order."""

    def __init__(self, personas: Sequence[Persona]) -> None:
        self._personas = {p.name: p for p in personas}
        if len(self._personas) != len(personas):
            raise ValueError(f"persona names repeat: {[p.name for p in personas]}")
        self._loras: dict[str, tuple[Path, ...]] = {}
        for p in personas:
            if len({a for a, _ in p.adapters}) != len(p.adapters):
                raise ValueError(f"persona {p.name!r} lists an adapter file twice: {[str(a) for a, _ in p.adapters]}")
            files = self._loras.setdefault(p.base, ())
            self._loras[p.base] = files + tuple(f for f in dict.fromkeys(a for a, _ in p.adapters) if f not in files)
        self._lora_ids = {
            p.name: tuple((self._loras[p.base].index(path), scale) for path, scale in p.adapters) for p in personas
        }

    @classmethod
    def from_settings(cls, settings: ServeSettings) -> PersonaSet:
        return cls([Persona.from_settings(p) for p in settings.personas])

    def __contains__(self, name: object) -> bool:
        return name in self._personas

    def __iter__(self) -> Iterator[Persona]:
        return iter(self._personas.values())

    def __len__(self) -> int:
        return len(self._personas)

    def names(self) -> list[str]:
        return list(self._personas)

    def get(self, name: str) -> Persona:
        try:
            return self._personas[name]
        except KeyError:
            raise UnknownModelError(f"no persona {name!r}; personas: {', '.join(self._personas) or 'none'}") from None

    def bases(self) -> list[str]:
        """The models that personas apply to (each loaded once, with all its personas' adapters)."""
        return list(self._loras)

    def loras_for(self, base: str) -> tuple[Path, ...]:
        """The distinct adapter files of the personas on ``base``, in order of first use in the configuration: what
        ``ModelSpec.loras`` loads; a request names them by index in this tuple (``GenerationRequest.lora``)."""
        return self._loras.get(base, ())

    def lora_of(self, name: str) -> tuple[tuple[int, float], ...]:
        """``GenerationRequest.lora`` for persona ``name``: (index in ``loras_for(base)``, scale) of each adapter."""
        self.get(name)
        return self._lora_ids[name]

    def apply(self, name: str, request: GenerationRequest) -> GenerationRequest:
        """``request`` (for persona ``name``) as the engine runs it on the persona's base:

        - ``model``: the base; ``lora``: the persona's adapters (replacing any the request had).
        - chat: the persona's system prompt goes first: merged into the conversation's first message when that is a
          ``system`` (or ``developer``) message with text (the persona's text, a blank line, the client's), else
          as a new first ``system`` message.
        - raw-prompt completions: the prompt is left as it is (no role to put a system prompt in, and a raw prompt
          is the exact text the client wants continued); adapters, caps and filters still apply.
        - ``params.max_tokens``: the smaller of the request's and the persona's; ``max_words``: the smaller of any
          already set and the persona's; ``forbidden_phrases``: the request's and the persona's. Structured output
          (``json_schema`` or ``grammar``) gets neither text filter: removing text or cutting at a word would
          break the document the grammar guarantees (``max_tokens`` still applies).
        """
        persona = self.get(name)
        params = request.params
        updates: dict[str, Any] = {}
        if persona.max_tokens is not None and persona.max_tokens < params.max_tokens:
            updates["max_tokens"] = persona.max_tokens
        if request.json_schema is None and request.grammar is None:
            updates["max_words"] = _smaller(params.max_words, persona.max_words)
            updates["forbidden_phrases"] = tuple(dict.fromkeys((*params.forbidden_phrases, *persona.forbidden_phrases)))
        elif persona.max_words is not None or persona.forbidden_phrases:
            log.debug("persona %s: structured output; its word cap and phrase filter are not applied", name)
        messages = request.messages
        if messages is not None and persona.system_prompt:
            messages = with_system_prompt(messages, persona.system_prompt)
        return dataclasses.replace(
            request,
            model=persona.base,
            params=dataclasses.replace(params, **updates),
            messages=messages,
            lora=self._lora_ids[name],
        )


def _smaller(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def with_system_prompt(messages: Sequence[ChatMessage], system_prompt: str) -> tuple[ChatMessage, ...]:
    """``system_prompt`` before the conversation: merged into a first system/developer message (``system_prompt``,
    a blank line, the client's text), else a new first system message."""
    first = messages[0] if messages else None
    if first is not None and first.role in SYSTEM_ROLES and isinstance(first.content, str):
        merged = f"{system_prompt}\n\n{first.content}" if first.content.strip() else system_prompt
        return (dataclasses.replace(first, content=merged), *messages[1:])
    return (ChatMessage("system", system_prompt), *messages)


def routing_text(request: GenerationRequest) -> str:
    """What a router reads: the last user message's text (a chat), else the raw prompt."""
    if request.messages is not None:
        for message in reversed(request.messages):
            if message.role == "user" and message.content:
                return message.content
        return ""
    return request.prompt or ""


def build_router(settings: RouterSettings, personas: PersonaSet, embedder: TextEmbedder | None = None) -> Router:
    """The `Router` a ``routers:`` entry describes (its personas in configuration order; all when not listed).
    Embeddings and hybrid need ``embedder`` (the server's; call ``router.warm()`` at start-up)."""
    chosen = settings.personas if settings.personas is not None else personas.names()
    return Router(
        settings.name,
        [personas.get(name).route_profile() for name in chosen],
        default=settings.default,
        threshold=settings.threshold,
        method=settings.method,
        embedder=embedder,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Personas from an adapters folder (`edgellm serve --personas models/personas`)


def base_model_from_adapters(folder: Path, name: str | None = None) -> dict[str, Any]:
    """A ``models:`` entry for the base GGUF of ``folder/adapters.json`` (named after its file unless ``name``)."""
    manifest = load_adapter_manifest(folder)
    path = manifest.base.absolute_path
    return {"name": name or path.stem, "path": str(path)}


def personas_from_adapters(folder: Path, base_name: str | None = None) -> list[dict[str, Any]]:
    """A ``personas:`` entry for every adapter of ``folder/adapters.json``: on the manifest's base (the model
    `base_model_from_adapters` names), with the adapter at its recorded scale and the profile its train recipe
    gave it (none: the adapter alone, no prompt or caps)."""
    manifest = load_adapter_manifest(folder)
    manifest.check_files()
    base = base_name or manifest.base.absolute_path.stem
    entries = []
    for adapter in manifest.adapters:
        profile = adapter.persona.model_dump(exclude_none=True) if adapter.persona is not None else {}
        if adapter.persona is None:
            log.info("%s: adapter %s has no persona profile; served without prompt or caps", folder, adapter.name)
        entries.append(
            {
                "name": adapter.name,
                "base": base,
                "adapters": [{"path": str(adapter.absolute_path), "scale": adapter.scale}],
                **profile,
            }
        )
    return entries


def default_router(
    personas: Sequence[dict[str, Any]], name: str = "auto", default: str | None = None, method: str = "keywords"
) -> dict[str, Any]:
    """A ``routers:`` entry over ``personas`` (entries as `personas_from_adapters` makes), defaulting to
    ``default`` or the first persona."""
    if not personas:
        raise RoutingError("no personas to route to")
    return {"name": name, "default": default or personas[0]["name"], "method": method}
