"""Realistic requests against OpenAI-compatible servers side by side: ``edgellm bench workloads``.

    edgellm bench workloads --edgellm --llama-server ../shared/tools/llama-server/llama-server --out reports/workloads
    edgellm bench workloads --server mine=http://127.0.0.1:8000 --server theirs=http://127.0.0.1:8080

The request set (``bench/data/workloads-v2.jsonl``, versioned, written for the project, CC0) holds several requests
of each workload: ``chat`` (free chat, nothing to copy), ``rag`` (an answer quoting given passages), ``rewrite`` (a
paragraph with small edits), ``code_edit`` (code in, the whole changed code out), ``extract`` (JSON-schema
``response_format``) and ``multiturn`` (a chat asked to repeat an earlier turn). Each has a fixed ``max_tokens``; all
run at temperature 0 (greedy), streamed.

Servers: any running ones (``--server NAME=URL``), a real ``edgellm serve`` started here (``--edgellm``; more with
``--edgellm-variant NAME:KEY=VALUE,...``, each ``KEY=VALUE`` a ``--set`` override), and with ``--llama-server PATH``
llama.cpp's own server twice: drafting off (``llama-server``) and with n-gram drafting (``llama-server-ngram``,
``--llama-spec``), all with the same model, threads, slots and per-slot context. All run at once (idle ones cost
nothing) and take turns round by round, in rotating order, so the machine's drift weighs on all alike.

For each workload and each level of concurrent streams (1 and 4), ``rounds`` rounds: a round sends the workload's
next ``n`` requests at once, each level going on where the one before stopped (``schedule``), so with the shipped
set (16 requests per workload) and the default levels and rounds no request is sent twice in a run: a server that
remembers earlier answers (a shared n-gram cache such as llama-server's ``ngram-mod`` or edgellm's
``draft.shared``) cannot replay them. The report counts the requests a run sends again (``repeats``), and the warm-up
request is not one of the set. Per workload, level and server:

- aggregate tok/s = completion tokens of all streams / wall time of the rounds;
- TTFT p50/p95 = request sent -> first non-empty content chunk;
- draft acceptance = sum of ``draft_n_accepted`` / sum of ``draft_n`` from the responses' ``timings`` (llama-server's
  field names; edgellm reports the same), where the server reports them;
- for ``extract``, how many answers parse as a JSON object.

Writes ``workloads.json``, ``workloads.md`` and ``workloads.png`` with ``out``. Numbers compare within one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgellm.bench import servers as launch
from edgellm.bench.charts import save_png, subplots
from edgellm.bench.errors import BenchError
from edgellm.bench.stats import percentile
from edgellm.bench.tables import markdown_table
from edgellm.fsutil import atomic_write_text
from edgellm.paths import shipped

if TYPE_CHECKING:
    import httpx

    from edgellm.bench.client import StreamResult

log = logging.getLogger(__name__)

WORKLOADS = ("chat", "rag", "rewrite", "code_edit", "extract", "multiturn")
COPY_HEAVY = ("rag", "rewrite", "code_edit", "extract")
REQUEST_SET = "bench/data/workloads-v2.jsonl"
DEFAULT_MODEL = Path("models/SmolLM2-135M-Instruct.Q4_1.gguf")
# llama-server's n-gram drafting for the comparison: the setting the issue measured (ngram-simple: a 12-token
# lookup, up to 48 drafted tokens); --llama-spec tries others (shorter lookups, ngram-map-k, ngram-mod)
LLAMA_SPEC = ("--spec-type", "ngram-simple")


@dataclass(frozen=True)
class WorkloadRequest:
    id: str
    workload: str
    max_tokens: int
    messages: tuple[dict[str, str], ...]
    response_format: dict[str, Any] | None = None

    def body(self, model: str) -> dict[str, Any]:
        """The streamed chat request, greedy."""
        from edgellm.bench.client import chat_body

        body = chat_body(model, self.messages, max_tokens=self.max_tokens, temperature=0.0)
        if self.response_format is not None:
            body["response_format"] = self.response_format
        return body


@dataclass
class Cell:
    """One server on one workload at one number of concurrent streams."""

    server: str
    workload: str
    streams: int
    requests: int
    tokens: int
    wall_s: float
    aggregate: float
    ttft_p50: float
    ttft_p95: float
    draft_n: int | None = None  # None: the server reported no draft counts
    draft_n_accepted: int | None = None
    json_ok: int | None = None  # extract only: answers that parse as a JSON object
    samples: list[str] = field(default_factory=list)  # the first answer of each request (for reading, not scoring)

    @property
    def acceptance(self) -> float | None:
        return (self.draft_n_accepted or 0) / self.draft_n if self.draft_n else None


@dataclass
class WorkloadReport:
    model: str
    threads: int
    slots: int
    n_ctx: int
    levels: list[int]
    rounds: int
    request_set: str
    request_set_sha256: str
    servers: dict[str, str]  # name -> how it was started (or its URL)
    repeats: int  # requests sent again in the run (answers a server may have kept from the first time)
    created_at: str
    cells: list[Cell] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    def cell(self, server: str, workload: str, streams: int) -> Cell | None:
        for c in self.cells:
            if (c.server, c.workload, c.streams) == (server, workload, streams):
                return c
        return None

    def to_json(self) -> str:
        data = asdict(self)
        for c, d in zip(self.cells, data["cells"], strict=True):
            d["acceptance"] = c.acceptance
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


# -- the request set ------------------------------------------------------------------------------------------------
def load_requests(path: Path | None = None) -> list[WorkloadRequest]:
    """The requests of a set (default: the shipped ``workloads-v2``); a bad line is named with its number."""
    path = path if path is not None else shipped(REQUEST_SET)
    out: list[WorkloadRequest] = []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            req = WorkloadRequest(
                id=str(d["id"]),
                workload=str(d["workload"]),
                max_tokens=int(d["max_tokens"]),
                messages=tuple({"role": str(m["role"]), "content": str(m["content"])} for m in d["messages"]),
                response_format=d.get("response_format"),
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise BenchError(f"{path}:{no}: not a workload request ({type(e).__name__}: {e})") from None
        if req.workload not in WORKLOADS:
            raise BenchError(f"{path}:{no}: workload must be one of {', '.join(WORKLOADS)}, got {req.workload!r}")
        if req.max_tokens < 1 or not req.messages:
            raise BenchError(f"{path}:{no}: needs max_tokens >= 1 and at least one message")
        out.append(req)
    return out


# -- driving the servers --------------------------------------------------------------------------------------------
# the first request to each server (threads, caches, grammar compilation), not one of the set
WARMUP = WorkloadRequest("warmup", "chat", 16, ({"role": "user", "content": "Say hello in five words."},))


def schedule(reqs: Sequence[WorkloadRequest], levels: Sequence[int], rounds: int) -> list[list[list[WorkloadRequest]]]:
    """One workload's rounds per level: each round the next ``n`` requests (``n`` streams), each level going on where
    the one before stopped, wrapping around when the workload has fewer requests than the run sends."""
    out: list[list[list[WorkloadRequest]]] = []
    sent = 0
    for n in levels:
        level = []
        for _ in range(rounds):
            level.append([reqs[(sent + j) % len(reqs)] for j in range(n)])
            sent += n
        out.append(level)
    return out


def count_repeats(plans: Sequence[list[list[list[WorkloadRequest]]]]) -> int:
    """Requests sent again in a run (same id, same workload)."""
    seen: set[tuple[str, str]] = set()
    again = 0
    for plan in plans:
        for level in plan:
            for batch in level:
                for r in batch:
                    key = (r.workload, r.id)
                    again += key in seen
                    seen.add(key)
    return again


async def one_request(client: httpx.AsyncClient, server: str, url: str, model: str, req: WorkloadRequest) -> StreamResult:
    from edgellm.bench.client import stream_chat

    res = await stream_chat(client, url, req.body(model))
    if not res.ok:
        raise BenchError(f"{server} ({url}): request {req.id} failed ({res.error}): {res.detail}")
    return res


def summarize(server: str, workload: str, n: int, results: list[tuple[WorkloadRequest, StreamResult]],
              walls: list[float]) -> Cell:  # fmt: skip
    total = sum(r.completion_tokens for _, r in results)
    ttfts = [1000 * r.ttft for _, r in results if r.ttft is not None]
    if not ttfts:
        raise BenchError(f"{server}, {workload}, {n} stream(s): no request produced any text")
    drafted = [r.timings for _, r in results if r.timings and "draft_n" in r.timings]
    samples: dict[str, str] = {}
    for req, r in results:
        samples.setdefault(req.id, r.text)
    json_ok = None
    if workload == "extract":
        json_ok = sum(1 for _, r in results if _is_json_object(r.text))
    return Cell(
        server=server,
        workload=workload,
        streams=n,
        requests=len(results),
        tokens=total,
        wall_s=sum(walls),
        aggregate=total / sum(walls),
        ttft_p50=percentile(ttfts, 50),
        ttft_p95=percentile(ttfts, 95),
        draft_n=sum(int(t["draft_n"]) for t in drafted) if drafted else None,
        draft_n_accepted=sum(int(t.get("draft_n_accepted", 0)) for t in drafted) if drafted else None,
        json_ok=json_ok,
        samples=list(samples.values()),
    )


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


async def run_workloads(
    urls: dict[str, str], names: dict[str, str], requests: dict[str, list[WorkloadRequest]], levels: list[int],
    rounds: int,
) -> list[Cell]:  # fmt: skip
    """Every workload at every level, the servers taking turns round by round in rotating order."""
    import httpx

    # a new connection per request: llama-server (cpp-httplib) closes a kept-alive connection after 5 requests
    limits = httpx.Limits(max_keepalive_connections=0)
    servers = list(urls)
    cells: list[Cell] = []
    async with httpx.AsyncClient(timeout=600, trust_env=False, limits=limits) as client:
        for s in servers:
            await one_request(client, s, urls[s], names[s], WARMUP)
        for workload, reqs in requests.items():
            for n, level in zip(levels, schedule(reqs, levels, rounds), strict=True):
                results: dict[str, list[tuple[WorkloadRequest, StreamResult]]] = {s: [] for s in servers}
                walls: dict[str, list[float]] = {s: [] for s in servers}
                for r, batch in enumerate(level):
                    for s in servers[r % len(servers) :] + servers[: r % len(servers)]:
                        t0 = time.perf_counter()
                        got = await asyncio.gather(*(one_request(client, s, urls[s], names[s], q) for q in batch))
                        walls[s].append(time.perf_counter() - t0)
                        results[s].extend(zip(batch, got, strict=True))
                for s in servers:
                    cell = summarize(s, workload, n, results[s], walls[s])
                    log.info("%s, %s, %d stream(s): %.1f tok/s", s, workload, n, cell.aggregate)
                    cells.append(cell)
    return cells


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME:KEY=VALUE,KEY=VALUE`` -> (NAME, ["--set", "KEY=VALUE", ...])."""
    name, _, sets = text.partition(":")
    pairs = [p for p in sets.split(",") if p.strip()]
    if not name or any("=" not in p for p in pairs):
        raise BenchError(f"an edgellm variant is NAME:KEY=VALUE[,KEY=VALUE...], got {text!r}")
    return name, [a for p in pairs for a in ("--set", p.strip())]


def bench_workloads(
    servers: dict[str, str] | None = None,
    edgellm: dict[str, Sequence[str]] | None = None,
    llama_server: Path | None = None,
    llama_spec: Sequence[str] = LLAMA_SPEC,
    model: Path = DEFAULT_MODEL,
    threads: int = 2,
    slots: int = 4,
    n_ctx: int = 2048,
    levels: Sequence[int] = (1, 4),
    rounds: int = 3,
    workloads: Sequence[str] | None = None,
    per_workload: int | None = None,
    request_set: Path | None = None,
    out: Path | None = None,
) -> WorkloadReport:
    """Run the request set against ``servers`` (name -> running server's base URL), the edgellm servers started
    here (name -> extra ``edgellm serve`` arguments) and, with ``llama_server`` (a binary), llama-server with drafting
    off and with ``llama_spec``. ``workloads`` and ``per_workload`` (the first N requests of each) pick a subset."""
    servers = dict(servers or {})
    edgellm = dict(edgellm or {})
    started = [*edgellm, *(("llama-server", "llama-server-ngram") if llama_server is not None else ())]
    if not servers and not started:
        raise BenchError("no server to run against: give --server NAME=URL, --edgellm or --llama-server PATH")
    if len(set(servers) | set(started)) != len(servers) + len(started):
        raise BenchError(f"server names must differ: {', '.join([*servers, *started])}")
    if started and not model.is_file():
        raise BenchError(f"{model}: no such GGUF file (edgellm models pull default)")
    if llama_server is not None and not (llama_server.is_file() and os.access(llama_server, os.X_OK)):
        raise BenchError(f"{llama_server}: not an executable llama-server (see README, Benchmarks)")
    if not levels or min(levels) < 1 or rounds < 1 or (per_workload is not None and per_workload < 1):
        raise BenchError("levels, rounds and requests per workload must be >= 1")
    unknown = [w for w in workloads or () if w not in WORKLOADS]
    if unknown:
        raise BenchError(f"workloads must be some of {', '.join(WORKLOADS)}, not {', '.join(unknown)}")
    set_path = request_set if request_set is not None else shipped(REQUEST_SET)
    all_requests = load_requests(set_path)
    requests: dict[str, list[WorkloadRequest]] = {}
    for w in workloads or WORKLOADS:
        reqs = [r for r in all_requests if r.workload == w][:per_workload]
        if reqs:
            requests[w] = reqs
    if not requests:
        raise BenchError(f"{set_path}: no requests of workloads {', '.join(workloads or WORKLOADS)}")

    described = {name: url for name, url in servers.items()}
    with ExitStack() as stack:
        urls = dict(servers)
        for name, extra in edgellm.items():
            urls[name] = stack.enter_context(launch.edgellm_server(model, threads, slots, n_ctx, extra=extra))
            described[name] = " ".join(["edgellm serve --engine batched", *extra])
        if llama_server is not None:
            for name, extra in (("llama-server", ()), ("llama-server-ngram", tuple(llama_spec))):
                urls[name] = stack.enter_context(launch.llama_server(llama_server, model, threads, slots, n_ctx, extra))
                described[name] = " ".join([llama_server.name, *extra])
        names = {s: _model_id(u) for s, u in urls.items()}
        cells = asyncio.run(run_workloads(urls, names, requests, list(levels), rounds))
    report = WorkloadReport(
        model=str(model),
        threads=threads,
        slots=slots,
        n_ctx=n_ctx,
        levels=list(levels),
        rounds=rounds,
        request_set=set_path.name,
        request_set_sha256=hashlib.sha256(set_path.read_bytes()).hexdigest(),
        servers=described,
        repeats=count_repeats([schedule(reqs, list(levels), rounds) for reqs in requests.values()]),
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        cells=cells,
    )
    if out is not None:
        save_report(report, out)
    return report


def _model_id(url: str) -> str:
    import httpx

    return str(httpx.get(f"{url}/v1/models", timeout=10, trust_env=False).json()["data"][0]["id"])


# -- report ---------------------------------------------------------------------------------------------------------
def workloads_table(r: WorkloadReport) -> str:
    servers = list(r.servers)
    base = servers[0]
    lines = [
        f"model {Path(r.model).name}, {r.threads} threads, {r.slots} slots of {r.n_ctx} tokens, {r.rounds} round(s) "
        f"per level, request set {r.request_set} (sha256 {r.request_set_sha256[:12]}), temperature 0, {r.created_at}",
        "",
        f"{r.repeats} request(s) sent a second time in this run: a server that keeps earlier answers may replay "
        "them (with a shared n-gram cache)"
        if r.repeats
        else "no request sent twice in this run",
        "",
        *(f"- {name}: {how}" for name, how in r.servers.items()),
        "",
    ]
    rows = []
    for w in dict.fromkeys(c.workload for c in r.cells):
        for n in r.levels:
            ref = r.cell(base, w, n)
            for s in servers:
                c = r.cell(s, w, n)
                if c is None:
                    continue
                ratio = f"{c.aggregate / ref.aggregate:.2f}" if ref is not None and ref.aggregate > 0 else "–"
                acc = "–" if c.draft_n is None else f"{c.draft_n_accepted}/{c.draft_n}" + (
                    f" ({100 * c.acceptance:.0f}%)" if c.acceptance is not None else ""
                )
                js = "" if c.json_ok is None else f"{c.json_ok}/{c.requests}"  # "" keeps the two spaces: "|  |"
                rows.append(
                    [w, str(n), s, f"{c.aggregate:.1f}", ratio, f"{c.ttft_p50:.0f}", f"{c.ttft_p95:.0f}", acc, js]
                )
    lines += markdown_table(
        ["workload", "streams", "server", "tok/s", f"x {base}", "TTFT p50 ms", "TTFT p95 ms", "draft accepted",
         "JSON ok"],
        "lrl" + "r" * 6,
        rows,
        right="---:",
    )
    return "\n".join(lines) + "\n"


def workloads_chart(r: WorkloadReport, path: Path) -> None:
    """One column per level of concurrency: aggregate tok/s (top) and TTFT p50 with p95 whiskers (bottom), grouped
    by workload, one bar per server."""
    servers = list(r.servers)
    workloads = list(dict.fromkeys(c.workload for c in r.cells))
    fig, axes = subplots(2, len(r.levels), figsize=(6.5 * len(r.levels), 8), squeeze=False)
    width = 0.8 / max(1, len(servers))
    for col, n in enumerate(r.levels):
        ax_t, ax_l = axes[0][col], axes[1][col]
        for k, s in enumerate(servers):
            cells = [r.cell(s, w, n) for w in workloads]
            xs = [i + (k - (len(servers) - 1) / 2) * width for i in range(len(workloads))]
            ax_t.bar(xs, [c.aggregate if c else 0 for c in cells], width, label=s)
            p50 = [c.ttft_p50 if c else 0 for c in cells]
            p95 = [c.ttft_p95 if c else 0 for c in cells]
            ax_l.bar(xs, p50, width, label=s)
            ax_l.errorbar(xs, p50, yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p95, strict=True)]],
                          fmt="none", ecolor="black", capsize=2)  # fmt: skip
        for ax, ylabel in ((ax_t, "aggregate completion tok/s"), (ax_l, "TTFT ms (p50, whisker p95)")):
            ax.set_xticks(range(len(workloads)), workloads, rotation=20)
            ax.set_ylabel(ylabel)
            ax.grid(axis="y", alpha=0.3)
        ax_t.set_title(f"{n} stream{'s' if n > 1 else ''}")
        ax_t.legend(fontsize=8)
    fig.suptitle(f"{Path(r.model).name}: workloads ({r.request_set}), {r.threads} threads, temperature 0")
    fig.tight_layout()
    save_png(fig, path)


def save_report(report: WorkloadReport, out: Path) -> None:
    """``workloads.md``, ``workloads.png`` and ``workloads.json`` in ``out``; ``report.files`` says where."""
    out.mkdir(parents=True, exist_ok=True)
    report.files = {k: str(out / f"workloads.{k}") for k in ("json", "md", "png")}
    atomic_write_text(out / "workloads.md", workloads_table(report))
    workloads_chart(report, out / "workloads.png")
    atomic_write_text(out / "workloads.json", report.to_json())


# -- command line ---------------------------------------------------------------------------------------------------
def add_workloads_parser(
    bsub: argparse._SubParsersAction,
    int_list: Callable[[str], list[int]],
    print_report: Callable[[str, dict[str, str]], int],
) -> None:
    """``edgellm bench workloads``: registered by ``bench/cli.py``, which prints through ``print_report``."""
    w = bsub.add_parser(
        "workloads",
        help="realistic requests (chat, RAG, rewrite, code edit, JSON extraction, multi-turn) against servers side "
        "by side: tok/s, TTFT, draft acceptance",
        description="A versioned request set (default bench/data/workloads-v2.jsonl), greedy and streamed, against every "
        "server given (running ones, edgellm started here, llama-server with n-gram drafting off and on), the "
        "servers taking turns round by round at each level of concurrent streams. Prints a Markdown table; --out "
        "also writes JSON and a chart.",
    )
    w.add_argument("--server", action="append", default=[], metavar="NAME=URL", help="a running server (repeat)")
    w.add_argument("--edgellm", action="store_true", help="start edgellm serve (batched) here, named edgellm")
    w.add_argument("--edgellm-variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="start another edgellm serve with these --set overrides (repeat)")  # fmt: skip
    w.add_argument("--llama-server", type=Path, default=None, help="also run this llama-server, drafting off and on")
    w.add_argument("--llama-spec", default=" ".join(LLAMA_SPEC),
                   help=f"llama-server's drafting arguments (default: {' '.join(LLAMA_SPEC)})")  # fmt: skip
    w.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the GGUF of servers started here")
    w.add_argument("--threads", type=int, default=2, help="llama.cpp threads of servers started here (default: 2)")
    w.add_argument("--slots", type=int, default=4, help="slots of servers started here (default: 4)")
    w.add_argument("--ctx", type=int, default=2048, help="context per slot (default: 2048)")
    w.add_argument("--levels", type=int_list, default=[1, 4], help="concurrent streams (default: 1,4)")
    w.add_argument("--rounds", type=int, default=3, help="rounds per workload and level (default: 3)")
    w.add_argument("--workloads", default=",".join(WORKLOADS), help=f"a subset of {','.join(WORKLOADS)}")
    w.add_argument("--requests", type=int, default=None, help="use the first N requests of each workload")
    w.add_argument("--request-set", type=Path, default=None, help=f"a JSONL request set (default: {REQUEST_SET})")
    w.add_argument("--out", type=Path, default=None, help="folder for workloads.json, workloads.md, workloads.png")
    w.set_defaults(func=lambda args: _run(args, print_report))


def _run(args: argparse.Namespace, print_report: Callable[[str, dict[str, str]], int]) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    servers: dict[str, str] = {}
    for item in args.server:
        name, sep, url = item.partition("=")
        if not sep or not name or not url:
            raise BenchError(f"--server is NAME=URL, got {item!r}")
        servers[name] = url.rstrip("/")
    edgellm: dict[str, Sequence[str]] = {"edgellm": []} if args.edgellm else {}
    edgellm.update(parse_variant(v) for v in args.edgellm_variant)
    report = bench_workloads(
        servers=servers,
        edgellm=edgellm,
        llama_server=args.llama_server,
        llama_spec=args.llama_spec.split(),
        model=args.model,
        threads=args.threads,
        slots=args.slots,
        n_ctx=args.ctx,
        levels=args.levels,
        rounds=args.rounds,
        workloads=[w for w in args.workloads.split(",") if w],
        per_workload=args.requests,
        request_set=args.request_set,
        out=args.out,
    )
    return print_report(workloads_table(report), report.files)
