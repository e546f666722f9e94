"""Routing a message to a persona without an LLM call, and saying why: trigger keywords (< 1 ms), similarity to
each persona's description with an embedding model, or both.

A contract module (stdlib only; numpy is imported when an embedder is used): `serve` routes ``model: "auto"``
requests with it (``serve.personas.build_router`` makes one from a ``RouterSettings``) and `bench routing` measures
it on a labelled set, without either importing the other::

    router = Router("auto", [RouteProfile("hammy", ("code", "bug")), RouteProfile("olive", ("sad", "i feel"))],
                    default="hammy")
    decision = router.route("I feel sad about my code")
    decision.persona, decision.scores            # "olive", {"hammy": 1.0, "olive": 3.0}
    decision.header_value()                      # "persona=olive; method=keywords; scores=hammy:1.0,olive:3.0"

Scores, per persona (the method's threshold in brackets; below it the default persona answers, ``fallback``):

- ``keywords`` [1]: the number of trigger words matched: each distinct trigger found in the message counts its
  number of words (``"python"`` 1, ``"step by step"`` 3). Matching is on whole words, case-insensitive, after light
  normalization of both sides: apostrophes dropped (``don't`` = ``dont``), other punctuation splits words, a plural
  ``s`` / ``es`` / ``ies`` reduced (``bugs`` = ``bug``, ``worries`` = ``worry``).
- ``embeddings`` [0.15]: cosine similarity of the message to the persona's description followed by its triggers.
- ``hybrid`` [1]: the keyword score plus the similarity in units of the embeddings threshold
  (``keywords + similarity / 0.15``): one trigger word weighs as much as a description the message is as close to
  as the embeddings threshold asks.

The highest score wins; equal top scores go to the default persona when it is among them, else to the first in the
router's order.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from urllib.parse import quote

log = logging.getLogger(__name__)

RouteMethod = Literal["keywords", "embeddings", "hybrid"]
EMBEDDINGS_THRESHOLD = 0.15
DEFAULT_THRESHOLDS: dict[str, float] = {"keywords": 1.0, "embeddings": EMBEDDINGS_THRESHOLD, "hybrid": 1.0}

_WORD = re.compile(r"[^\W_]+")
_APOSTROPHES = str.maketrans("", "", "'\u2019")


class RoutingError(ValueError):
    """A router that cannot work as configured (no personas, an unknown default, embeddings without an embedder)."""


def stem(word: str) -> str:
    """A plural reduced to its singular, lightly (``bugs`` -> ``bug``, ``boxes`` -> ``box``, ``worries`` ->
    ``worry``); words ending in ``ss``, ``us`` or ``is`` are kept (``stress``, ``anxious``, ``this``)."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("sses", "xes", "zes", "ches", "shes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def words(text: str) -> tuple[str, ...]:
    """``text`` as the words triggers are matched on: case-folded, apostrophes dropped, split at anything that is not a
    letter or digit, plurals reduced (`stem`)."""
    return tuple(stem(w) for w in _WORD.findall(text.casefold().translate(_APOSTROPHES)))


class _Vectors(Protocol):
    @property
    def vectors(self) -> Any: ...


class TextEmbedder(Protocol):
    """What routing needs from an embedder (``serve.engine.embed.Embedder`` is one): unit-length vectors for texts,
    one row per text. Blocking."""

    def embed(self, inputs: Sequence[str]) -> _Vectors: ...


@dataclass(frozen=True)
class RouteProfile:
    """What a router knows of one persona."""

    name: str
    triggers: tuple[str, ...] = ()
    description: str | None = None

    def text(self) -> str:
        """What the message is compared with by embeddings: the description, then the triggers."""
        parts = [self.description or self.name]
        if self.triggers:
            parts.append(", ".join(self.triggers))
        return ". ".join(parts)


@dataclass(frozen=True)
class RouteDecision:
    """The persona chosen for a message, and why."""

    persona: str
    method: RouteMethod
    scores: dict[str, float]  # every persona of the router, in its order
    threshold: float
    fallback: bool  # no score reached the threshold: the default persona
    reason: str
    matched: dict[str, tuple[str, ...]] = field(default_factory=dict)  # keywords, hybrid: the triggers found

    def as_dict(self) -> dict[str, Any]:
        """For a response's extension field (``"edgellm_route"``)."""
        return {
            "persona": self.persona,
            "method": self.method,
            "scores": {k: round(v, 4) for k, v in self.scores.items()},
            "threshold": self.threshold,
            "fallback": self.fallback,
            "reason": self.reason,
            "matched": {k: list(v) for k, v in self.matched.items() if v},
        }

    def header_value(self) -> str:
        """A compact ASCII value for a response header (``x-edgellm-route``): ``persona=hammy; method=keywords;
        scores=hammy:2.0,pip:0.0,olive:1.0`` (``; fallback=true`` when the default answered for lack of a match).
        Names are percent-encoded where they are not plain ASCII."""
        scores = ",".join(f"{_safe(k)}:{round(v, 3)}" for k, v in self.scores.items())
        value = f"persona={_safe(self.persona)}; method={self.method}; scores={scores}"
        return value + "; fallback=true" if self.fallback else value


def _safe(name: str) -> str:
    return quote(name, safe="-_.~+@!*'()[]/")


class Router:
    """Chooses one of ``profiles`` for a message. ``method`` other than keywords needs ``embedder``; the persona
    vectors are computed once (on the first embedding route, or by `warm`). ``route`` is then blocking (an async
    caller runs it in a worker thread: see ``blocking``); the keyword method takes microseconds."""

    def __init__(
        self,
        name: str,
        profiles: Sequence[RouteProfile],
        default: str,
        threshold: float | None = None,
        method: RouteMethod = "keywords",
        embedder: TextEmbedder | None = None,
    ) -> None:
        self.name = name
        self.profiles = tuple(profiles)
        names = [p.name for p in self.profiles]
        if not names:
            raise RoutingError(f"router {name!r}: no personas to choose from")
        if len(set(names)) != len(names):
            raise RoutingError(f"router {name!r}: persona names repeat: {names}")
        if default not in names:
            raise RoutingError(f"router {name!r}: its default {default!r} is not among its personas {names}")
        if method not in DEFAULT_THRESHOLDS:
            raise RoutingError(f"router {name!r}: method {method!r}; use one of {sorted(DEFAULT_THRESHOLDS)}")
        if method != "keywords" and embedder is None:
            raise RoutingError(f"router {name!r}: method {method!r} needs an embedder (configure `embedder`)")
        self.default = default
        self.method: RouteMethod = method
        self.threshold = DEFAULT_THRESHOLDS[method] if threshold is None else float(threshold)
        self.embedder = embedder
        self._triggers = {p.name: _compile(p.triggers) for p in self.profiles}
        self._lengths = sorted({len(t) for ts in self._triggers.values() for t, _ in ts})
        self._vectors: Any = None
        self._lock = threading.Lock()

    @property
    def blocking(self) -> bool:
        """True when ``route`` runs the embedding model (call it from a worker thread)."""
        return self.method != "keywords"

    def warm(self) -> None:
        """Embed the persona texts now (at start-up) rather than on the first request."""
        if self.blocking:
            self._persona_vectors()

    def route(self, text: str) -> RouteDecision:
        matched = self.keyword_matches(text) if self.method != "embeddings" else {}
        keyword = {name: float(sum(len(words(t)) for t in found)) for name, found in matched.items()}
        if self.method == "keywords":
            scores = keyword
        else:
            similarity = self.similarities(text)
            if self.method == "embeddings":
                scores = similarity
            else:
                scores = {n: keyword[n] + similarity[n] / EMBEDDINGS_THRESHOLD for n in similarity}
        return self._decide(scores, matched)

    def keyword_matches(self, text: str) -> dict[str, tuple[str, ...]]:
        """Each persona's triggers found in ``text`` (whole words, normalized as `words`)."""
        tokens = words(text)
        grams = {n: {tokens[i : i + n] for i in range(len(tokens) - n + 1)} for n in self._lengths}
        return {
            name: tuple(original for gram, original in triggers if gram in grams[len(gram)])
            for name, triggers in self._triggers.items()
        }

    def similarities(self, text: str) -> dict[str, float]:
        """Cosine similarity of ``text`` to each persona's `RouteProfile.text` (blocking: runs the embedder)."""
        import numpy as np

        vectors = self._persona_vectors()
        assert self.embedder is not None
        message = np.asarray(self.embedder.embed([text]).vectors, dtype=np.float32)[0]
        sims = vectors @ message
        return {p.name: float(s) for p, s in zip(self.profiles, sims, strict=True)}

    def _persona_vectors(self) -> Any:
        with self._lock:
            if self._vectors is None:
                import numpy as np

                assert self.embedder is not None
                texts = [p.text() for p in self.profiles]
                self._vectors = np.asarray(self.embedder.embed(texts).vectors, dtype=np.float32)
                log.info("router %r: embedded %d persona descriptions", self.name, len(texts))
            return self._vectors

    def _decide(self, scores: dict[str, float], matched: dict[str, tuple[str, ...]]) -> RouteDecision:
        best = max(scores.values())
        if best < self.threshold:
            reason = f"no persona reached the threshold {self.threshold:g} (best {best:.3g}): the default"
            return RouteDecision(self.default, self.method, scores, self.threshold, True, reason, matched)
        top = [name for name, s in scores.items() if s == best]
        chosen = self.default if self.default in top else top[0]
        reason = f"{chosen} scored {best:.3g} (threshold {self.threshold:g})"
        if len(top) > 1:
            reason += f"; a tie with {', '.join(n for n in top if n != chosen)}, " + (
                "the default wins" if chosen == self.default else "the first in order wins"
            )
        if matched.get(chosen):
            reason += f"; matched {', '.join(repr(t) for t in matched[chosen])}"
        return RouteDecision(chosen, self.method, scores, self.threshold, False, reason, matched)


def _compile(triggers: Sequence[str]) -> tuple[tuple[tuple[str, ...], str], ...]:
    """(normalized words, as written) of each distinct trigger that has words."""
    seen: dict[tuple[str, ...], str] = {}
    for trigger in triggers:
        gram = words(trigger)
        if not gram:
            raise RoutingError(f"trigger {trigger!r} has no letters or digits to match")
        seen.setdefault(gram, trigger)
    return tuple((gram, original) for gram, original in seen.items())
