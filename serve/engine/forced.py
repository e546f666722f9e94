"""What a grammar forces next: a GBNF recognizer in Python, for jump-forward drafts (``speculative.py``) and for
closing a JSON answer within its budget (``sampling.py``: the shortest completion, and the text a required key
forces).

llama.cpp's grammar sampler tells which *tokens* a grammar allows, one position at a time, at the cost of a pass
over the vocabulary. Jump-forward needs something else: the *text* the grammar allows next when there is only one
way on (``customer": "`` after ``{"c`` under a schema with the key ``customer`` first). This module follows the
output character by character with the same algorithm as llama.cpp (``src/llama-grammar.cpp``: a set of parse
stacks, each stack the rule positions still to match, its top a terminal) and walks ahead while exactly one
character is allowed.

``space`` (JSON's optional whitespace) leaves a choice at nearly every seam: nothing, a space, newlines and an
indent. There the walk follows the request's own *style*: the whitespace this output wrote after the same
character before (after ``:`` one space, before ``:`` none, ...; until seen, one space after ``:`` and ``,``,
nothing elsewhere). The result is only a guess either way: the engine drafts its tokens and the model verifies
them, so a wrong style, or a spelling of the text in other tokens than the tokenizer's, costs a rejected draft
token and never changes the output.

*Spellings.* A model under a grammar often writes forced text in other tokens than the tokenizer's: SmolLM2 writes
the key ``"reported_by"`` as ``re|port|ed|_|by``, not ``reported|_|by``, and a draft in the tokenizer's tokens is
rejected at its first token. ``ModelHabits.spellings`` remembers, per model, the tokens its answers wrote each
forced text in (the text from a point outside a string: keys, brackets, whitespace, never the rest of a value the
model began), and the next draft of the same text uses them. Measured on the extraction workload (one stream,
``edgellm bench jump-forward``, 4 December), over context drafting alone: requests answered before 1.20-1.25x, new
schemas 1.15x, as the tokenizer's tokens (1.08-1.15x); an oracle drafting the forced text in exactly the tokens
the model then wrote 1.33-1.34x. The model's spelling of a word varies with what precedes it, so spellings pay
where the same keys come in the same context again.

    grammar = parse_gbnf(text)          # GbnfError if the text uses what this recognizer does not follow
    rec = Recognizer(grammar)
    rec.advance('{"c')                  # False: the text is not in the grammar (then stop using it)
    rec.forced()                        # ('ustomer": "', False): the text and whether only the end may follow
    rec.shortest()                      # the fewest characters that complete the text in the grammar

Supported GBNF: rules, alternatives, sequences, groups, string literals, character classes (negated, ranges,
escapes), ``.``, ``*``, ``+``, ``?``, ``{m}``, ``{m,}``, ``{m,n}``, comments. Token references (``<[id]>``,
``<|name|>``) raise ``GbnfError``: such a grammar simply gets no jump-forward drafts. Pure Python; nothing here
calls llama.cpp.
"""

from __future__ import annotations

import codecs
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

WHITESPACE = frozenset(" \t\n\r")
PUNCTUATION = frozenset('{}[],:"')  # characters whose whitespace around them the style tells apart
DEFAULT_STYLE = {":": " ", ",": " "}  # the whitespace after a character until the output shows its own
SMALL_CLASS = 4  # a character class of at most this many characters is followed (whitespace: ``[ \t]``)
MAX_STACKS = 256  # an ambiguous grammar with more parse stacks than this is not followed (no drafts)
MAX_DEPTH = 512  # rule expansions without consuming a character (left recursion guard)
FORCED_CHARS = 64  # the longest forced text one walk returns
SPELLINGS = 4096  # forced texts whose spelling a model's habits keep (least recently used out)
WATCHED = 8  # forced texts a request waits at once to see spelled


class GbnfError(ValueError):
    """The grammar text uses something this recognizer does not follow (or is not GBNF)."""


@dataclass(frozen=True)
class CharSet:
    """A terminal: one character out of ``ranges`` (inclusive code point pairs), or out of everything but them."""

    ranges: tuple[tuple[int, int], ...]
    negated: bool = False

    def matches(self, ch: str) -> bool:
        c = ord(ch)
        inside = any(lo <= c <= hi for lo, hi in self.ranges)
        return inside != self.negated

    def small(self) -> frozenset[str] | None:
        """The characters it allows if they are few (``SMALL_CLASS``), else None."""
        if self.negated:
            return None
        if sum(hi - lo + 1 for lo, hi in self.ranges) > SMALL_CLASS:
            return None
        return frozenset(chr(c) for lo, hi in self.ranges for c in range(lo, hi + 1))


Element = CharSet | str  # a terminal, or the name of a rule


@dataclass
class Gbnf:
    """A parsed grammar: every alternative of every rule as a tuple of elements, in one list (``alts``), and each
    rule's alternatives as indexes into it (``rules``)."""

    alts: list[tuple[Element, ...]] = field(default_factory=list)
    rules: dict[str, list[int]] = field(default_factory=dict)
    root: str = "root"
    _suffix: list[list[float]] | None = None

    def suffix_lengths(self) -> list[list[float]]:
        """Per alternative, the fewest characters that complete it from each position (inf: it cannot end)."""
        if self._suffix is None:
            inf = float("inf")
            rule_min = dict.fromkeys(self.rules, inf)
            changed = True
            while changed:  # a fixed point: a rule's shortest string, from its alternatives' elements
                changed = False
                for name, alts in self.rules.items():
                    best = min(
                        (sum(1 if isinstance(el, CharSet) else rule_min[el] for el in self.alts[a]) for a in alts),
                        default=inf,
                    )
                    if best < rule_min[name]:
                        rule_min[name], changed = best, True
            suffix: list[list[float]] = []
            for alt in self.alts:
                tail = [0.0] * (len(alt) + 1)
                for i in range(len(alt) - 1, -1, -1):
                    el = alt[i]
                    tail[i] = tail[i + 1] + (1 if isinstance(el, CharSet) else rule_min[el])
                suffix.append(tail)
            self._suffix = suffix
        return self._suffix


class _Parser:
    """GBNF text -> ``Gbnf`` (the syntax of llama.cpp's ``grammar-parser``), groups and repetitions written out as
    rules of their own."""

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.bodies: dict[str, list[list[Element]]] = {}
        self.n_synthetic = 0

    def parse(self) -> Gbnf:
        self.space(newlines=True)
        while self.i < len(self.s):
            name = self.name()
            self.space(newlines=False)
            if not self.s.startswith("::=", self.i):
                raise GbnfError(f"expected '::=' after rule name {name!r} at offset {self.i}")
            self.i += 3
            self.space(newlines=True)
            self.bodies[name] = self.alternatives(nested=False)
            self.space(newlines=True)
        if "root" not in self.bodies:
            raise GbnfError("the grammar has no 'root' rule")
        out = Gbnf()
        for name, bodies in self.bodies.items():
            out.rules[name] = []
            for body in bodies:
                out.rules[name].append(len(out.alts))
                out.alts.append(tuple(body))
        for alt in out.alts:
            for el in alt:
                if isinstance(el, str) and el not in out.rules:
                    raise GbnfError(f"undefined rule {el!r}")
        return out

    # -- lexing -------------------------------------------------------------------------------------------------
    def space(self, newlines: bool) -> None:
        s = self.s
        while self.i < len(s):
            c = s[self.i]
            if c == "#":
                while self.i < len(s) and s[self.i] not in "\r\n":
                    self.i += 1
            elif c in " \t" or (newlines and c in "\r\n"):
                self.i += 1
            else:
                return

    def name(self) -> str:
        start = self.i
        while self.i < len(self.s) and (self.s[self.i].isalnum() or self.s[self.i] in "-_") and self.s[self.i].isascii():
            self.i += 1
        if self.i == start:
            raise GbnfError(f"expected a rule name at offset {start}")
        return self.s[start : self.i]

    def char(self) -> int:
        """One (maybe escaped) character of a literal or class; returns its code point."""
        s = self.s
        if self.i >= len(s):
            raise GbnfError("unexpected end of grammar")
        c = s[self.i]
        self.i += 1
        if c != "\\":
            return ord(c)
        if self.i >= len(s):
            raise GbnfError("unexpected end of grammar after '\\'")
        e = s[self.i]
        self.i += 1
        simple = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "[": "[", "]": "]", "-": "-", "^": "^"}
        if e in simple:
            return ord(simple[e])
        digits = {"x": 2, "u": 4, "U": 8}.get(e)
        if digits is None:
            raise GbnfError(f"unknown escape '\\{e}' at offset {self.i - 2}")
        hex_text = s[self.i : self.i + digits]
        self.i += digits
        try:
            return int(hex_text, 16)
        except ValueError as exc:
            raise GbnfError(f"bad escape '\\{e}{hex_text}'") from exc

    # -- syntax -------------------------------------------------------------------------------------------------
    def alternatives(self, nested: bool) -> list[list[Element]]:
        alts = [self.sequence(nested)]
        while self.i < len(self.s) and self.s[self.i] == "|":
            self.i += 1
            self.space(newlines=True)
            alts.append(self.sequence(nested))
        return alts

    def sequence(self, nested: bool) -> list[Element]:
        seq: list[Element] = []
        last: list[Element] = []  # the elements of the last item (a repetition applies to them)
        s = self.s
        while self.i < len(s):
            c = s[self.i]
            if c == '"':
                self.i += 1
                last = []
                while self.i < len(s) and s[self.i] != '"':
                    cp = self.char()
                    last.append(CharSet(((cp, cp),)))
                if self.i >= len(s):
                    raise GbnfError("unterminated string literal")
                self.i += 1
            elif c == "[":
                self.i += 1
                negated = self.i < len(s) and s[self.i] == "^"
                if negated:
                    self.i += 1
                ranges: list[tuple[int, int]] = []
                while self.i < len(s) and s[self.i] != "]":
                    lo = self.char()
                    hi = lo
                    if self.i + 1 < len(s) and s[self.i] == "-" and s[self.i + 1] != "]":
                        self.i += 1
                        hi = self.char()
                    ranges.append((lo, hi))
                if self.i >= len(s):
                    raise GbnfError("unterminated character class")
                self.i += 1
                last = [CharSet(tuple(ranges), negated)]
            elif c == ".":
                self.i += 1
                last = [CharSet((), negated=True)]
            elif c == "(":
                self.i += 1
                self.space(newlines=True)
                body = self.alternatives(nested=True)
                if self.i >= len(s) or s[self.i] != ")":
                    raise GbnfError(f"expected ')' at offset {self.i}")
                self.i += 1
                last = [self.synthetic(body)]
            elif c.isalnum() or c in "-_":
                start = self.i
                ref = self.name()
                after = self.i
                self.space(newlines=False)
                if self.s.startswith("::=", self.i):  # the next rule's head: this sequence has ended
                    self.i = start
                    return seq
                self.i = after
                last = [ref]
            elif c in "*+?{":
                if not last:
                    raise GbnfError(f"'{c}' with nothing to repeat at offset {self.i}")
                seq = seq[: len(seq) - len(last)]
                last = self.repetition(last)
            elif c in "<!":
                raise GbnfError("token references are not followed")
            else:
                break  # '|', ')', a newline: the caller decides
            seq.extend(last)
            self.space(newlines=nested)
        return seq

    def synthetic(self, alts: list[list[Element]]) -> str:
        self.n_synthetic += 1
        name = f"_{self.n_synthetic}"
        self.bodies[name] = alts
        return name

    def repetition(self, item: list[Element]) -> list[Element]:
        c = self.s[self.i]
        self.i += 1
        if c == "*":
            lo, hi = 0, None
        elif c == "+":
            lo, hi = 1, None
        elif c == "?":
            lo, hi = 0, 1
        else:
            end = self.s.find("}", self.i)
            if end < 0:
                raise GbnfError("unterminated '{'")
            spec = self.s[self.i : end].replace(" ", "")
            self.i = end + 1
            try:
                if "," in spec:
                    a, b = spec.split(",", 1)
                    lo, hi = int(a), (int(b) if b else None)
                else:
                    lo = hi = int(spec)
            except ValueError as exc:
                raise GbnfError(f"bad repetition '{{{spec}}}'") from exc
        out: list[Element] = []
        for _ in range(lo):
            out.extend(item)
        if hi is None:
            star = f"_{self.n_synthetic + 1}"
            self.n_synthetic += 1
            self.bodies[star] = [[*item, star], []]
            out.append(star)
        elif hi > lo:
            tail: list[Element] = []
            for _ in range(hi - lo):  # innermost first: opt_k ::= item opt_{k-1} | ""
                tail = [self.synthetic([[*item, *tail], []])]
            out.extend(tail)
        return out


def parse_gbnf(text: str) -> Gbnf:
    """Parse GBNF text (root rule ``root``); ``GbnfError`` if it is not GBNF this recognizer follows."""
    return _Parser(text).parse()


Stack = tuple[tuple[int, int], ...]  # (alternative, position) pairs, the top last


@dataclass
class JsonCursor:
    """Where a text is, for its whitespace style and the JSON closing reserve (``sampling.JsonTracker``): the last
    character that was not whitespace (``prev``), the whitespace written since (``run``), inside a string or not,
    and the bracket depth outside strings (JSON's; harmless for other text)."""

    prev: str = ""
    run: str = ""
    depth: int = 0
    in_string: bool = False
    escaped: bool = False

    def copy(self) -> JsonCursor:
        return JsonCursor(self.prev, self.run, self.depth, self.in_string, self.escaped)

    def push(self, ch: str) -> None:
        if ch in WHITESPACE:
            self.run += ch
            return
        self.prev, self.run = ch, ""
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
        elif ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth = max(0, self.depth - 1)


def _kind(ch: str | None) -> str:
    return "" if ch is None else ch if ch in PUNCTUATION else "v"


def _level(cur: JsonCursor, nxt: str | None) -> int:
    """The indentation level of a line that starts with ``nxt`` here (a closing bracket's is one less)."""
    return max(0, cur.depth - 1) if nxt is not None and nxt in "}]" else cur.depth


def _seams(cur: JsonCursor, nxt: str | None) -> list[tuple[str, ...]]:
    """The keys of a seam in the style, most specific first: the characters before and after the whitespace (JSON
    punctuation, or ``v`` for a value's) at this depth, then at any depth; the one after alone (at this depth, at
    any); the one before alone. (Pretty-printed JSON indents by depth; a closing bracket's seam is the same after
    any value.)"""
    p, n = _kind(cur.prev), _kind(nxt)
    if nxt is None:
        return [(p,)]
    d = str(cur.depth)
    return [(p, n, d), (p, n), ("*", n, d), ("*", n), (p,)]


class Recognizer:
    """Follows text through a grammar: the parse stacks after the text so far, the style of its whitespace, and
    what the grammar forces next. Not thread-safe (one per request)."""

    def __init__(self, grammar: Gbnf) -> None:
        self.g = grammar
        try:
            self.stacks: frozenset[Stack] = self._start()
        except GbnfError as e:  # too ambiguous to follow: a dead recognizer (no drafts)
            log.debug("jump-forward does not follow this grammar: %s", e)
            self.stacks = frozenset()
        self.style: dict[tuple[str, ...], str] = {}  # seam -> the whitespace the text wrote there (``_seams``)
        self.cursor = JsonCursor()  # where the text so far is: the last solid character, the whitespace since
        self.indent = 0  # spaces per level of pretty-printed JSON, once seen (0: not seen)
        self.seam = False  # the last ``forced`` text began with a choice about whitespace

    def _start(self) -> frozenset[Stack]:
        out: set[Stack] = set()
        for a in self.g.rules[self.g.root]:
            self._expand(((a, 0),), out, 0)
        return frozenset(out)

    def _expand(self, stack: Stack, out: set[Stack], depth: int) -> None:
        """Add to ``out`` the stacks ``stack`` stands for whose top is a terminal (or the empty stack: the end)."""
        if depth > MAX_DEPTH or len(out) > MAX_STACKS:
            raise GbnfError("the grammar is too ambiguous (or left-recursive) to follow")
        while stack:
            alt, pos = stack[-1]
            elems = self.g.alts[alt]
            if pos >= len(elems):
                stack = stack[:-1]
                continue
            el = elems[pos]
            if isinstance(el, CharSet):
                out.add(stack)
                return
            rest = stack[:-1] + ((alt, pos + 1),) if pos + 1 < len(elems) else stack[:-1]
            for a in self.g.rules[el]:
                self._expand(rest + ((a, 0),), out, depth + 1)
            return
        out.add(())

    def _step(self, stacks: frozenset[Stack], ch: str) -> frozenset[Stack]:
        out: set[Stack] = set()
        for stack in stacks:
            if not stack:
                continue
            alt, pos = stack[-1]
            term = self.g.alts[alt][pos]
            assert isinstance(term, CharSet)
            if term.matches(ch):
                elems = self.g.alts[alt]
                nxt = stack[:-1] + ((alt, pos + 1),) if pos + 1 < len(elems) else stack[:-1]
                self._expand(nxt, out, 0)
        return frozenset(out)

    @property
    def alive(self) -> bool:
        return bool(self.stacks)

    def shortest(self) -> float:
        """The fewest characters that complete the text in the grammar (0: it may end here; inf: dead)."""
        if () in self.stacks:
            return 0
        suffix = self.g.suffix_lengths()
        return min((sum(suffix[a][p] for a, p in stack) for stack in self.stacks), default=float("inf"))

    def advance(self, text: str) -> bool:
        """Follow ``text`` (the output's next characters); False, and no stacks left, if the grammar does not allow
        it (or it gets too ambiguous to follow): the recognizer is then dead."""
        stacks = self.stacks
        try:
            for ch in text:
                stacks = self._step(stacks, ch)
                if not stacks:
                    break
                self._learn(ch)
        except GbnfError:
            stacks = frozenset()
        self.stacks = stacks
        return bool(stacks)

    def _learn(self, ch: str) -> None:
        cur = self.cursor
        if ch not in WHITESPACE and cur.prev and not cur.in_string:  # a seam between JSON tokens
            for seam in _seams(cur, ch):
                self.style[seam] = cur.run
            level = _level(cur, ch)
            spaces = len(cur.run) - 1
            if cur.run.startswith("\n") and cur.run[1:] == " " * spaces and level > 0 and spaces % level == 0:
                self.indent = spaces // level
        cur.push(ch)

    def _want(self, cur: JsonCursor, solid: set[str]) -> str:
        """The whitespace the style expects at this seam (the one solid character allowed next, if one): what the
        text wrote at the same seam; a newline re-indented to this depth when it was at another."""
        nxt = next(iter(solid)) if len(solid) == 1 else None
        for seam in _seams(cur, nxt):
            want = self.style.get(seam)
            if want is None:
                continue
            if len(seam) != 3 and want.startswith("\n") and self.indent and want[1:] == " " * (len(want) - 1):
                return "\n" + " " * (self.indent * _level(cur, nxt))
            return want
        return DEFAULT_STYLE.get(cur.prev, "")

    def forced(self, limit: int = FORCED_CHARS, compact: bool = False) -> tuple[str, bool]:
        """The text the grammar allows next when there is one way on (whitespace choices follow the style), and
        whether after it the grammar is complete with nothing more allowed (only the end of generation).
        ``seam`` says afterwards whether its first character was a choice about whitespace (a likelier miss).
        ``compact``: no whitespace where the grammar lets it be left out (the shortest way on)."""
        stacks, cur = self.stacks, self.cursor.copy()
        out: list[str] = []
        self.seam = False
        try:
            while len(out) < limit:
                if () in stacks:
                    return "".join(out), len(stacks) == 1
                allowed: set[str] = set()
                wide = False  # some terminal allows many characters (a string's, a digit's): only whitespace
                for stack in stacks:  # by the style can be guessed then
                    alt, pos = stack[-1]
                    term = self.g.alts[alt][pos]
                    assert isinstance(term, CharSet)
                    chars = term.small()
                    if chars is None:
                        wide = True
                        allowed |= {c for c in WHITESPACE if term.matches(c)}
                    else:
                        allowed |= chars
                solid = allowed - WHITESPACE
                guess_space = (len(allowed) > 1 and not wide) or (wide and cur.depth > 0 and cur.prev in PUNCTUATION)
                guess_space = guess_space and not cur.in_string and not compact  # free text's spaces: no guess
                want = self._want(cur, solid if not wide else set()) if guess_space else ""
                run = cur.run
                if len(allowed) == 1 and not wide:
                    ch = next(iter(allowed))
                elif len(run) < len(want) and want[len(run)] in allowed:  # a choice of whitespace: the style's
                    ch = want[len(run)]
                elif len(solid) == 1 and not wide:  # whitespace (not the style's) or one character
                    ch = next(iter(solid))
                else:
                    return "".join(out), False
                if not out:
                    self.seam = guess_space
                stacks = self._step(stacks, ch)
                if not stacks:  # cannot happen for an allowed character; stop rather than guess
                    return "".join(out), False
                out.append(ch)
                cur.push(ch)
        except GbnfError:
            pass
        return "".join(out), False


@dataclass(frozen=True)
class DraftVocab:
    """What jump-forward needs of a model's vocabulary: a token's bytes (``piece``), text to tokens (``encode``,
    no BOS, special tokens as text), the end-of-generation tokens, and the one to draft where the grammar is
    complete (``eot``; None: none is drafted)."""

    piece: Callable[[int], bytes]
    encode: Callable[[str], list[int]]
    eog: frozenset[int]
    eot: int | None = None


@dataclass
class ModelHabits:
    """What a model's own answers showed about their form, for the next requests' jump-forward guesses (one per
    model): the end-of-generation token its answers end with (``DraftVocab.eot`` until one ends with another:
    SmolLM2's end-of-turn token by llama.cpp's metadata is ``<|endoftext|>``, its chat answers end with
    ``<|im_end|>``), the whitespace layout of its last JSON answer (``Recognizer.style``: which whitespace at
    which seam, and the indent; no text of the answer), and the tokens its answers wrote forced texts in
    (``spellings``, when ``spell``: text the grammar determined from a point outside a string, never text of a
    value; shared by the model's requests, so an answer's speed can show that the same forced text, i.e. the
    same schema keys, was written before, as a reused prompt prefix shows it was sent before)."""

    end: int | None = None
    style: dict[tuple[str, ...], str] = field(default_factory=dict)
    indent: int = 0
    spell: bool = True
    spellings: OrderedDict[bytes, tuple[int, ...]] = field(default_factory=OrderedDict)

    def spelling(self, text: bytes) -> tuple[int, ...] | None:
        """The tokens an answer wrote ``text`` in (a prefix of it, where the answer merged its last token with what
        followed; None: not seen)."""
        tokens = self.spellings.get(text)
        if tokens is not None:
            self.spellings.move_to_end(text)
        return tokens

    def learn(self, text: bytes, tokens: tuple[int, ...]) -> None:
        self.spellings[text] = tokens
        self.spellings.move_to_end(text)
        while len(self.spellings) > SPELLINGS:
            self.spellings.popitem(last=False)


class ForcedDrafter:
    """One request's jump-forward drafts: follows its output (``push``) through its grammar, and proposes the
    tokens of the text the grammar forces next (``draft``), plus the end-of-generation token where the grammar is
    complete. A grammar this recognizer loses track of (output it does not allow: a token-level or lazy grammar
    slipped through) just stops drafting."""

    def __init__(self, grammar: Gbnf, vocab: DraftVocab, habits: ModelHabits | None = None) -> None:
        self.rec = Recognizer(grammar)
        self.vocab = vocab
        self.habits = habits if habits is not None else ModelHabits(vocab.eot)
        self.rec.style.update(self.habits.style)
        self.rec.indent = self.habits.indent
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds a split character back
        self.seam = False  # the last draft began with a choice about whitespace (its own odds)
        self._out: list[int] = []  # the output's tokens so far, and where forced texts began that
        self._watch: dict[int, bytes] = {}  # the model is yet to be seen spelling (output index -> text)

    def push(self, tokens: Iterable[int]) -> None:
        """The output's next tokens (as emitted). Never raises: a drafting aid must not fail a request."""
        try:
            self._push(list(tokens))
        except Exception:  # noqa: BLE001 - a bug here costs the drafts, not the request
            log.warning("jump-forward failed; no more grammar drafts for this request", exc_info=True)
            self.rec.stacks = frozenset()

    def _push(self, tokens: list[int]) -> None:
        ends = [t for t in tokens if t in self.vocab.eog]
        if ends:
            self.habits.end = ends[-1]
        if self.habits.spell:
            self._out.extend(tokens)
            self._spelled()
        if not self.rec.alive:
            return
        text = self._text.decode(b"".join(self.vocab.piece(t) for t in tokens if t not in self.vocab.eog))
        if text and not self.rec.advance(text):
            log.debug("jump-forward lost track of the grammar at %r; no more grammar drafts for this request", text)

    def _spelled(self) -> None:
        """Learn the spelling of each watched forced text the output has now written, and of its ends from each
        token boundary on: its tokens, but for a last one that ran past the text's end (the model merged it with
        what came next). Nothing when the output wrote other text (the style's whitespace was wrong)."""
        for start, want in list(self._watch.items()):
            written, end = b"", start
            while end < len(self._out) and len(written) < len(want):
                token = self._out[end]
                written += self.vocab.piece(token) if token not in self.vocab.eog else b"\0"
                end += 1
            if len(written) < len(want) and want.startswith(written):
                continue  # not yet written in full
            del self._watch[start]
            if written != want:
                end -= 1  # its last token ran past the text's end (or the output wrote other text: nothing)
                if not written.startswith(want):
                    continue
            offset = 0  # the text from each token boundary on, for drafts that start there (a draft cut short)
            for i in range(start, end):
                self.habits.learn(want[offset:], tuple(self._out[i:end]))
                offset += len(self.vocab.piece(self._out[i]))

    def _tokens(self, text: str) -> list[int]:
        """``text`` in the tokens the model wrote it in before, or the tokenizer's. A text that begins outside a
        string is also watched, to learn how the model spells it."""
        if not self.habits.spell:
            return self.vocab.encode(text)
        want = text.encode("utf-8")
        if not self.rec.cursor.in_string and len(self._watch) < WATCHED:
            self._watch.setdefault(len(self._out), want)
        spelled = self.habits.spelling(want)
        # a spelling of a prefix only: the model wrote the rest merged with what came next, so it is not drafted
        return list(spelled) if spelled is not None else self.vocab.encode(text)

    def finish(self) -> None:
        """The answer ended: its whitespace layout becomes the model's (if it followed the grammar to the end)."""
        if self.rec.alive and self.rec.style:
            self.habits.style = dict(self.rec.style)
            self.habits.indent = self.rec.indent

    def draft(self, k: int) -> list[int]:
        """Up to ``k`` tokens of the text the grammar forces next ([] if none, or mid-character)."""
        if k <= 0 or not self.rec.alive or self._text.getstate()[0]:  # mid-character: wait
            return []
        try:
            text, complete = self.rec.forced()
        except Exception:  # noqa: BLE001 - as in ``push``
            log.warning("jump-forward failed; no more grammar drafts for this request", exc_info=True)
            self.rec.stacks = frozenset()
            return []
        self.seam = self.rec.seam
        tokens = self._tokens(text) if text else []
        if complete and self.habits.end is not None:
            tokens.append(self.habits.end)
        return tokens[:k]


__all__ = [
    "CharSet",
    "DraftVocab",
    "ForcedDrafter",
    "Gbnf",
    "GbnfError",
    "JsonCursor",
    "ModelHabits",
    "Recognizer",
    "parse_gbnf",
]
