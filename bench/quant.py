"""`edgellm bench quant`: compare the GGUF variants of one model on size, speed and quality.

Reads top to bottom: find the variants -> measure the reference in a fresh process (it writes its next-token
log-probabilities on the held-out text) -> measure each variant in its own fresh process against them ->
write ``results.json``, ``results.md`` and ``chart.png``.

Per variant: size on disk, bits per weight (tensor bits / parameters, as llama.cpp reports BPW), load time, peak
resident memory of its process; prompt processing (one ``n_prompt``-token batch) and generation (``n_gen``
single-token decodes) tokens/s after a warm-up, over ``reps`` repetitions from an empty cache (llama-bench's
protocol, random tokens); perplexity, KL divergence and top-1 agreement against the reference
(llama-perplexity's ``--kl-divergence`` method, see ``bench/quality.py``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from edgellm.bench.variants import BenchError, Variant, find_variants
from edgellm.fsutil import atomic_write_text

log = logging.getLogger(__name__)

DEFAULT_TEXT = Path(__file__).parent / "data" / "heldout.txt"
DEFAULT_TEXT_SOURCE = "bench/data/heldout.txt: prose written for edgellm (Apache-2.0), see bench/data/README.md"


@dataclass
class VariantResult:
    label: str
    quant: str
    path: str
    is_reference: bool
    size_bytes: int
    bits_per_weight: float
    n_params: int
    load_s: float
    rss_before_load_mib: float
    peak_rss_mib: float
    pp: dict[str, Any]
    tg: dict[str, Any]
    quality: dict[str, Any]
    desc: str = ""


@dataclass
class QuantReport:
    model: str
    source: str
    reference: str
    reference_is_float: bool
    threads: int
    reps: int
    n_prompt: int
    n_gen: int
    n_ctx: int
    n_chunks: int
    n_text_tokens: int
    text: str
    repack: bool
    created_at: str
    system: dict[str, Any]
    variants: list[VariantResult] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def default_threads() -> int:
    """Physical cores, as llama-bench's default (``common_cpu_get_num_math``)."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _system_info() -> dict[str, Any]:
    import psutil

    try:
        from importlib.metadata import version

        binding = version("llama_cpp_python")
    except Exception:
        binding = "unknown"
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "physical_cpus": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "llama_cpp_python": binding,
        "python": platform.python_version(),
    }


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _measure(variant: Variant, spec: dict[str, Any], bar: tqdm) -> dict[str, Any]:
    """Run ``bench.worker`` on one variant in a fresh process; advance ``bar`` as it reports progress."""
    bar.set_postfix_str(variant.label)
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgellm.bench.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=_worker_env(),
        )
        assert proc.stdin and proc.stdout
        proc.stdin.write(json.dumps({**spec, "path": str(variant.path)}))
        proc.stdin.close()
        result: dict[str, Any] | None = None
        failure: dict[str, Any] | None = None
        try:
            for line in proc.stdout:
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    log.debug("worker: %s", line.rstrip())
                    continue
                kind = event.pop("event", None)
                if kind == "progress":
                    bar.update(1)
                    bar.set_postfix_str(f"{variant.label}: {event.get('step', '')}")
                elif kind == "result":
                    result = event
                elif kind == "error":
                    failure = event
            rc = proc.wait()
        finally:  # interrupted (Ctrl-C): do not leave the worker running
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        tail = "\n".join(err.read().strip().splitlines()[-8:])
    if failure is not None:
        raise BenchError(f"{variant.label} ({variant.path.name}): {failure.get('message')}")
    if rc != 0 or result is None:
        how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}"
        hint = ""
        if rc == -signal.SIGSEGV and spec.get("repack", True):
            hint = (
                "; llama.cpp crashed: some builds segfault in their AMX/repacked CPU kernels, try --no-repack"
            )
        raise BenchError(f"measuring {variant.label} ({variant.path.name}) failed ({how}){hint}\n{tail}".rstrip())
    return result


def bench_quant(
    src: Path,
    out: Path,
    text: Path | None = None,
    threads: int | None = None,
    reps: int = 5,
    n_prompt: int = 512,
    n_gen: int = 128,
    n_ctx: int = 512,
    max_chunks: int | None = None,
    reference: str | None = None,
    repack: bool = True,
    progress: bool = True,
) -> QuantReport:
    """Benchmark every variant under ``src`` (a manifest folder or a folder of GGUFs) into ``out``.

    ``text`` is the held-out text (default: ``bench/data/heldout.txt``), cut into ``n_ctx``-token chunks (at most
    ``max_chunks``); ``threads`` defaults to the physical core count; ``reference`` picks the reference in a folder
    without a manifest.
    """
    if reps < 1 or n_prompt < 1 or n_gen < 1:
        raise BenchError(f"reps, n_prompt and n_gen must be >= 1 (got {reps}, {n_prompt}, {n_gen})")
    if n_ctx < 8 or n_ctx % 2:
        raise BenchError(f"n_ctx must be an even number >= 8, got {n_ctx}")
    text_path = Path(text) if text else DEFAULT_TEXT
    if not text_path.is_file():
        raise BenchError(f"{text_path}: no such text file")
    threads = threads or default_threads()
    out = Path(out)

    # 1. The variants and the reference.
    vset = find_variants(Path(src), reference)
    log.info(
        "benchmarking %d variants of %s (reference %s) with %d threads",
        len(vset.variants),
        vset.name,
        vset.reference.label,
        threads,
    )

    # 2. Measure each variant in its own process; the reference first, writing its log-probabilities.
    text_tokens_guess = len(text_path.read_text(encoding="utf-8").split()) * 4 // 3
    chunks_guess = max(1, text_tokens_guess // n_ctx)
    if max_chunks:
        chunks_guess = min(chunks_guess, max_chunks)
    steps_per_variant = 2 + 2 * reps + chunks_guess
    results: list[VariantResult] = []
    run_meta: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-ref-") as ref_dir, tqdm(
        total=steps_per_variant * len(vset.variants), desc=f"bench {vset.name}", unit="step", file=sys.stderr,
        disable=not progress,
    ) as bar:
        spec = {
            "threads": threads,
            "reps": reps,
            "n_prompt": n_prompt,
            "n_gen": n_gen,
            "n_ctx": n_ctx,
            "text_path": str(text_path),
            "max_chunks": max_chunks,
            "ref_dir": ref_dir,
            "repack": repack,
        }
        for variant in vset.variants:
            is_ref = variant is vset.reference
            r = _measure(variant, {**spec, "ref_mode": "write" if is_ref else "read"}, bar)
            if is_ref:
                # Now the real chunk count is known: size the bar for the rest.
                steps_per_variant = 2 + 2 * reps + r["n_chunks"]
                bar.total = bar.n + steps_per_variant * (len(vset.variants) - 1)
                bar.refresh()
                run_meta = {"n_chunks": r["n_chunks"], "n_text_tokens": r["n_text_tokens"]}
            results.append(
                VariantResult(
                    label=variant.label,
                    quant=variant.quant,
                    path=str(variant.path),
                    is_reference=is_ref,
                    size_bytes=variant.size_bytes,
                    bits_per_weight=r["tensor_bytes"] * 8 / r["n_params"],
                    n_params=r["n_params"],
                    load_s=r["load_s"],
                    rss_before_load_mib=r["rss_before_load_mib"],
                    peak_rss_mib=r["peak_rss_mib"],
                    pp=r["pp"],
                    tg=r["tg"],
                    quality=r["quality"],
                    desc=r["desc"],
                )
            )

    # 3. Record: JSON, Markdown table, chart.
    report = QuantReport(
        model=vset.name,
        source=f"{vset.source}: {Path(src)}",
        reference=vset.reference.label,
        reference_is_float=vset.reference_is_float,
        threads=threads,
        reps=reps,
        n_prompt=n_prompt,
        n_gen=n_gen,
        n_ctx=n_ctx,
        n_chunks=run_meta["n_chunks"],
        n_text_tokens=run_meta["n_text_tokens"],
        text=DEFAULT_TEXT_SOURCE if text is None else str(text_path),
        repack=repack,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        system=_system_info(),
        variants=results,
    )
    from edgellm.bench.report import quant_chart, quant_table

    out.mkdir(parents=True, exist_ok=True)
    report.files = {"json": str(out / "results.json"), "table": str(out / "results.md"), "chart": str(out / "chart.png")}
    atomic_write_text(out / "results.md", quant_table(report))
    quant_chart(report, out / "chart.png")
    atomic_write_text(out / "results.json", report.to_json())
    return report
