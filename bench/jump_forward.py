"""Jump-forward on the extraction workload, and how far it is from its ceiling: ``edgellm bench jump-forward``.

    edgellm bench jump-forward [--rounds 3] [--requests 16] [--out reports/jump-forward]

The batched engine in this process, the default model, one stream, the ``extract`` requests of the shipped
workload set (each its own JSON schema), greedy. Variants, taking turns request by request:

- ``off``: no drafts. ``ngram``: drafts from the context only (jump-forward off).
- ``tokenizer``: jump-forward, the forced text drafted in the tokenizer's tokens (``jump_forward_spellings`` off).
- ``spelled-seen``: the default: forced text in the tokens the model wrote it in before (``forced.ModelHabits``),
  each request having been answered before (its own keys' spellings, in the same contexts, remembered: a repeated or
  regenerated request, or a schema sent again with text that leads into the keys alike).
- ``spelled-new``: the same drafter with the spellings the *other* requests' answers taught (their schemas differ):
  a schema not seen before.
- ``own-tokens``: a drafter that knows each answer (from a first pass) drafts the same forced text, in exactly the
  tokens the model is about to write: the ceiling of any spelling guess.
- ``ceiling``: it drafts every token the grammar determines (keys, punctuation, and whitespace outside strings,
  as the model writes them): the ceiling of any jump-forward, whatever its whitespace and spelling guesses.

Rows still cost what they cost, and the cost-aware policy still chooses how many to draft, so the ceilings say what
verification of forced text can buy on this machine at best. The first round learns (spellings, layout, draft odds)
and is not counted; the rest are. tok/s is each variant's generated tokens over its wall time.
Writes ``jump-forward.json``, ``.md`` and ``.png`` with ``--out``.
"""

from __future__ import annotations

import asyncio
import codecs
import datetime as dt
import json
import logging
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgellm.bench.charts import save_png, subplots
from edgellm.bench.errors import BenchError
from edgellm.bench.grammar_speed import one
from edgellm.bench.tables import markdown_table
from edgellm.bench.workloads import WorkloadRequest, load_requests
from edgellm.fsutil import atomic_write_text
from edgellm.serve.engine import (
    WHITESPACE,
    BatchedEngine,
    ChatMessage,
    DraftPolicy,
    DraftVocab,
    ForcedDrafter,
    Gbnf,
    GenerationRequest,
    ModelHabits,
    ModelSpec,
    Recognizer,
    SamplingParams,
)

log = logging.getLogger(__name__)

MODEL_NAME = "bench-model"
VARIANTS = ("off", "ngram", "tokenizer", "spelled-new", "spelled-seen", "own-tokens", "ceiling")
Key = tuple[object, ...]  # a grammar, by its rules (the same for the same grammar parsed by another engine)


@dataclass
class Known:
    """What the first pass saw: the answers (token ids) written under each grammar, the grammars themselves, and per
    grammar the spellings the other grammars' answers teach (``unseen``, built on first use)."""

    answers: dict[Key, list[list[int]]] = field(default_factory=dict)
    grammars: dict[Key, Gbnf] = field(default_factory=dict)
    _unseen: dict[Key, OrderedDict[bytes, tuple[int, ...]]] = field(default_factory=dict)

    def unseen(self, key: Key, vocab: DraftVocab) -> OrderedDict[bytes, tuple[int, ...]]:
        """The spellings a model's memory would hold had it answered every request but those under ``key``: the
        other answers replayed through a drafter (drafting at each token as the engine does, so it watches and
        learns the same forced texts)."""
        if key not in self._unseen:
            habits = ModelHabits(vocab.eot)
            for other, answers in self.answers.items():
                if other == key:
                    continue
                for answer in answers:
                    drafter = ForcedDrafter(self.grammars[other], vocab, habits)
                    drafter.push(answer[:1])
                    for token in answer[1:]:
                        drafter.draft(8)
                        drafter.push([token])
            self._unseen[key] = habits.spellings
        return OrderedDict(self._unseen[key])


def _key(grammar: Gbnf) -> Key:
    """The same grammar parsed by another engine has the same key (each engine parses its own)."""
    return (grammar.root, *grammar.alts)


class _Recorder(ForcedDrafter):
    """The default drafter, keeping each answer's tokens (the first pass: what the oracles will know)."""

    def __init__(self, grammar: Gbnf, vocab: DraftVocab, habits: ModelHabits, known: Known) -> None:
        super().__init__(grammar, vocab, habits)
        self.known = known

    def finish(self) -> None:
        super().finish()
        key = _key(self.rec.g)
        self.known.answers.setdefault(key, []).append(list(self._out))
        self.known.grammars.setdefault(key, self.rec.g)


class _Unseen(ForcedDrafter):
    """The default drafter, but its spellings are those the other requests' answers taught (never this request's
    own from an earlier round): the case of a schema, and its context, not seen before. Layout and end token are the
    engine's, as usual."""

    def __init__(self, grammar: Gbnf, vocab: DraftVocab, habits: ModelHabits, known: Known) -> None:
        own = ModelHabits(habits.end, dict(habits.style), habits.indent, spellings=known.unseen(_key(grammar), vocab))
        super().__init__(grammar, vocab, own)
        self.engine_habits = habits

    def finish(self) -> None:
        super().finish()
        self.engine_habits.end = self.habits.end
        self.engine_habits.style, self.engine_habits.indent = self.habits.style, self.habits.indent


class _Oracle(ForcedDrafter):
    """Drafts from the answer it knows (the first pass's, under the same grammar, that agrees with the output so
    far): ``own-tokens`` the forced text in the answer's tokens; ``every`` (the ceiling) every token the grammar
    determines."""

    def __init__(self, grammar: Gbnf, vocab: DraftVocab, habits: ModelHabits, known: Known, every: bool) -> None:
        super().__init__(grammar, vocab, habits)
        self.known = known.answers.get(_key(grammar), [])
        self.every = every
        self._marks: dict[int, list[bool]] = {}  # per known answer (its index): which tokens the grammar determines

    def draft(self, k: int) -> list[int]:
        n = len(self._out)
        which = next((i for i, a in enumerate(self.known) if a[:n] == self._out), None)
        if k <= 0 or which is None or not self.rec.alive:
            return []
        answer = self.known[which]
        if self.every:
            marks = self._marks.get(which)
            if marks is None:
                marks = self._marks[which] = determined(self.rec.g, self.vocab, answer)
            j = n
            while j < len(answer) and marks[j]:
                j += 1
            return answer[n:j][:k]
        text, complete = self.rec.forced()
        self.seam = self.rec.seam
        want, got, j = text.encode("utf-8"), b"", n
        while j < len(answer) and answer[j] not in self.vocab.eog and want.startswith(got + self.vocab.piece(answer[j])):
            got += self.vocab.piece(answer[j])
            j += 1
        if got == want and complete and j < len(answer) and answer[j] in self.vocab.eog:
            j += 1
        return answer[n:j][:k]


def determined(grammar: Gbnf, vocab: DraftVocab, tokens: list[int]) -> list[bool]:
    """For each token of an answer: does the grammar determine all its characters where it stands (one character
    allowed; or whitespace where only whitespace or one character is, or between JSON tokens)? The end token
    counts where the grammar is complete."""
    rec = Recognizer(grammar)
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out: list[bool] = []
    for t in tokens:
        if t in vocab.eog:
            out.append(rec.stacks == frozenset({()}))
            continue
        ok = True
        for ch in text.decode(vocab.piece(t)):
            allowed: set[str] = set()
            wide = False
            for stack in rec.stacks:
                if stack:
                    alt, pos = stack[-1]
                    small = rec.g.alts[alt][pos].small()  # type: ignore[union-attr]
                    wide = wide or small is None
                    allowed |= small or set()
            cur = rec.cursor
            if wide:
                ok = ok and ch in WHITESPACE and not cur.in_string and cur.depth > 0
            else:
                ok = ok and (len(allowed) == 1 or ch in WHITESPACE or len(allowed - WHITESPACE) == 1)
            rec.advance(ch)
        out.append(ok)
    return out


def policy(variant: str, known: Known) -> DraftPolicy | None:
    """The drafting policy of one variant (None: drafting off); the oracles, and ``spelled-new``, use ``known``."""
    if variant == "off":
        return None
    if variant == "ngram":
        return DraftPolicy(jump_forward=False)
    if variant == "tokenizer":
        return DraftPolicy(jump_forward_spellings=False)
    if variant == "spelled-seen":
        return DraftPolicy(forced_drafter=lambda g, vocab, habits: _Recorder(g, vocab, habits, known))
    if variant == "spelled-new":
        return DraftPolicy(forced_drafter=lambda g, vocab, habits: _Unseen(g, vocab, habits, known))
    every = variant == "ceiling"
    return DraftPolicy(forced_drafter=lambda g, vocab, habits: _Oracle(g, vocab, habits, known, every))


@dataclass
class Row:
    variant: str
    tokens: int
    seconds: float
    tps: float
    drafted: int
    accepted: int
    vs_off: float = 1.0
    vs_ngram: float = 1.0


@dataclass
class JumpForwardBench:
    model: str
    threads: int
    requests: int
    rounds: int
    rows: list[Row]
    created_at: str
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def request(r: WorkloadRequest) -> GenerationRequest:
    assert r.response_format is not None
    return GenerationRequest(
        model=MODEL_NAME,
        messages=tuple(ChatMessage(m["role"], m["content"]) for m in r.messages),
        params=SamplingParams(max_tokens=r.max_tokens, temperature=0.0),
        json_schema=r.response_format["json_schema"]["schema"],
    )


async def measure(engines: dict[str, BatchedEngine], reqs: list[WorkloadRequest], rounds: int) -> list[Row]:
    totals = {v: [0, 0.0, 0, 0] for v in engines}
    for r in range(rounds):
        for i, wr in enumerate(reqs):
            # "spelled-seen" first in the first round: its answers are what the oracles know
            names = list(engines)
            order = names if r == 0 else names[i % len(names) :] + names[: i % len(names)]
            speeds = []
            for name in order:
                t0 = time.perf_counter()
                f = await one(engines[name], request(wr))
                seconds = time.perf_counter() - t0
                speeds.append(f"{name} {f.completion_tokens / seconds:.0f}")
                if r == 0 and rounds > 1:
                    continue
                tot = totals[name]
                tot[0] += f.completion_tokens
                tot[1] += seconds
                tot[2] += f.timings.draft_n or 0
                tot[3] += f.timings.draft_n_accepted or 0
            log.info(
                "round %d/%d%s, request %d/%d (%s): %s tok/s", r + 1, rounds, " (learning)" if r == 0 and rounds > 1 else "",
                i + 1, len(reqs), wr.id, ", ".join(speeds),
            )
    rows = [Row(v, int(t[0]), t[1], t[0] / t[1], int(t[2]), int(t[3])) for v, t in totals.items()]
    by = {row.variant: row.tps for row in rows}
    for row in rows:
        row.vs_off = row.tps / by["off"] if "off" in by else 1.0
        row.vs_ngram = row.tps / by["ngram"] if "ngram" in by else 1.0
    return [row for v in VARIANTS for row in rows if row.variant == v]


def bench_jump_forward(
    model: Path, threads: int = 2, rounds: int = 3, requests: int = 16, out: Path | None = None
) -> JumpForwardBench:
    """Run the comparison (see the module docstring); with ``out``, write JSON, Markdown and a chart."""
    if not model.is_file():
        raise BenchError(f"no model file at {model} (edgellm models pull default)")
    if rounds < 1 or requests < 1:
        raise BenchError(f"--rounds and --requests must be at least 1, got {rounds} and {requests}")
    reqs = [r for r in load_requests() if r.workload == "extract"][:requests]
    known = Known()
    spec = ModelSpec(name=MODEL_NAME, path=model, n_ctx=1024, n_threads=threads)
    order = ("spelled-seen", *(v for v in VARIANTS if v != "spelled-seen"))
    engines = {v: BatchedEngine([spec], slots=1, queue_size=4, draft=policy(v, known)) for v in order}
    try:
        rows = asyncio.run(measure(engines, reqs, rounds))
    finally:
        for e in engines.values():
            asyncio.run(e.close())
    result = JumpForwardBench(
        model=str(model),
        threads=threads,
        requests=len(reqs),
        rounds=rounds,
        rows=rows,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "jump-forward.json", result.to_json())
        atomic_write_text(out / "jump-forward.md", jump_forward_table(result))
        jump_forward_chart(result, out / "jump-forward.png")
        result.files = {k: str(out / f"jump-forward.{x}") for k, x in (("json", "json"), ("table", "md"), ("chart", "png"))}
    return result


def jump_forward_table(r: JumpForwardBench) -> str:
    counted = f"rounds 2-{r.rounds} counted" if r.rounds > 1 else "one round"
    lines = [
        f"Jump-forward on {r.requests} extraction requests ({Path(r.model).name}, {r.threads} threads, one stream, "
        f"greedy; {counted})",
        "",
        *markdown_table(
            ["variant", "tok/s", "vs off", "vs ngram", "drafted", "accepted", "tokens"],
            "lrrrrrr",
            (
                [x.variant, f"{x.tps:.1f}", f"{x.vs_off:.2f}", f"{x.vs_ngram:.2f}", str(x.drafted), str(x.accepted),
                 str(x.tokens)]
                for x in r.rows
            ),
        ),
        "",
        "spelled-seen: the default drafter, each request answered before (its own spellings remembered); spelled-new:"
        " spellings from the other requests only (a schema not seen before). own-tokens and ceiling know the answers:"
        " the best a spelling guess, and any jump-forward, could do here.",
    ]
    return "\n".join(lines) + "\n"


def jump_forward_chart(r: JumpForwardBench, path: Path) -> None:
    fig, ax = subplots(figsize=(9, 4.2))
    colours = ["#999999", "#7a9cc6", "#4c72b0", "#e9a77a", "#dd8452", "#c9c9c9", "#e0e0e0"]
    bars = ax.bar([x.variant for x in r.rows], [x.tps for x in r.rows], color=colours[: len(r.rows)])
    ax.bar_label(bars, [f"{x.vs_off:.2f}x" for x in r.rows], fontsize=8)
    ax.set_ylabel("tokens/s (one stream)")
    ax.set_title(f"{Path(r.model).name}: extraction under JSON schemas (x: vs drafting off)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_png(fig, path, dpi=120)


__all__ = ["JumpForwardBench", "bench_jump_forward", "determined", "jump_forward_chart", "jump_forward_table"]
