"""`edgellm bench quant`: compare the GGUF variants of one model on size, speed and quality.

``bench_quant`` reads top to bottom: setup (check the options, find the variants and their reference) -> measure
(the reference in a fresh process, writing its next-token log-probabilities on the held-out text, then each variant
in its own fresh process against them) -> verify (every variant scored on the reference's tokens) -> save
(``results.json``, ``results.md`` and ``chart.png``).

Per variant: size on disk, bits per weight (tensor bits / parameters, as llama.cpp reports BPW), load time, peak
resident memory of its process; prompt processing (one ``n_prompt``-token batch) and generation (``n_gen``
single-token decodes) tokens/s after a warm-up, over ``reps`` repetitions from an empty cache (llama-bench's
protocol, random tokens); perplexity, KL divergence and top-1 agreement against the reference
(llama-perplexity's ``--kl-divergence`` method, see ``bench/quality.py``). The worker is ``bench/worker.py``.
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
from collections.abc import Iterable
from dataclasses import asdict, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import psutil
from tqdm import tqdm

from edgellm.bench.errors import BenchError
from edgellm.bench.report import quant_chart, quant_table
from edgellm.bench.results import QuantReport, VariantResult
from edgellm.bench.variants import Variant, VariantSet, find_variants
from edgellm.bench.worker import WorkerSpec
from edgellm.fsutil import atomic_write_text
from edgellm.hardware import default_threads, physical_cores

log = logging.getLogger(__name__)

DEFAULT_TEXT = Path(__file__).parent / "data" / "heldout.txt"
DEFAULT_TEXT_SOURCE = "bench/data/heldout.txt: prose written for edgellm (Apache-2.0), see bench/data/README.md"


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
    # 1. Setup: the options, the variants and their reference.
    text_path = check_options(text, reps, n_prompt, n_gen, n_ctx)
    threads = threads or default_threads()
    vset = find_variants(Path(src), reference)
    log.info(
        "benchmarking %d variants of %s (reference %s) with %d threads",
        len(vset.variants),
        vset.name,
        vset.reference.label,
        threads,
    )

    # 2. Measure each variant in its own process; the reference first, writing its log-probabilities.
    with (
        tempfile.TemporaryDirectory(prefix="edgellm-bench-ref-") as ref_dir,
        progress_bar(vset, text_path, n_ctx, reps, max_chunks, progress) as bar,
    ):
        spec = WorkerSpec(
            path=str(vset.reference.path),
            threads=threads,
            reps=reps,
            n_prompt=n_prompt,
            n_gen=n_gen,
            n_ctx=n_ctx,
            text_path=str(text_path),
            max_chunks=max_chunks,
            ref_dir=ref_dir,
            ref_mode="write",
            repack=repack,
        )
        measured = measure_variants(vset, spec, bar)

    # 3. Verify: every variant was scored on the reference's chunks.
    verify_measurements(vset, measured)

    # 4. Save: JSON, Markdown table, chart.
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
        n_chunks=measured[0]["n_chunks"],
        n_text_tokens=measured[0]["n_text_tokens"],
        text=DEFAULT_TEXT_SOURCE if text is None else str(text_path),
        repack=repack,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        system=system_info(),
        variants=[
            variant_result(v, v is vset.reference, r) for v, r in zip(vset.variants, measured, strict=True)
        ],
    )
    save_report(report, Path(out))
    return report


# -- 1. setup -------------------------------------------------------------------------------------------------------
def check_options(text: Path | None, reps: int, n_prompt: int, n_gen: int, n_ctx: int) -> Path:
    """Refuse options that cannot work before anything is loaded; the held-out text's path."""
    if reps < 1 or n_prompt < 1 or n_gen < 1:
        raise BenchError(f"reps, n_prompt and n_gen must be >= 1 (got {reps}, {n_prompt}, {n_gen})")
    if n_ctx < 8 or n_ctx % 2:
        raise BenchError(f"n_ctx must be an even number >= 8, got {n_ctx}")
    text_path = Path(text) if text else DEFAULT_TEXT
    if not text_path.is_file():
        raise BenchError(f"{text_path}: no such text file")
    return text_path


def progress_bar(
    vset: VariantSet, text_path: Path, n_ctx: int, reps: int, max_chunks: int | None, enabled: bool
) -> tqdm:
    """A bar of worker steps, sized from a guess of the chunk count (``measure_variants`` corrects it)."""
    text_tokens_guess = len(text_path.read_text(encoding="utf-8").split()) * 4 // 3
    chunks_guess = max(1, text_tokens_guess // n_ctx)
    if max_chunks:
        chunks_guess = min(chunks_guess, max_chunks)
    steps_per_variant = 2 + 2 * reps + chunks_guess
    return tqdm(
        total=steps_per_variant * len(vset.variants), desc=f"bench {vset.name}", unit="step", file=sys.stderr,
        disable=not enabled,
    )  # fmt: skip


# -- 2. measure -----------------------------------------------------------------------------------------------------
def measure_variants(vset: VariantSet, spec: WorkerSpec, bar: tqdm) -> list[dict[str, Any]]:
    """The worker's result for each variant, in ``vset.variants`` order (the reference first)."""
    measured: list[dict[str, Any]] = []
    for variant in vset.variants:
        is_ref = variant is vset.reference
        r = run_worker(variant, replace(spec, path=str(variant.path), ref_mode="write" if is_ref else "read"), bar)
        if is_ref:
            # Now the real chunk count is known: size the bar for the rest.
            steps_per_variant = 2 + 2 * spec.reps + r["n_chunks"]
            bar.total = bar.n + steps_per_variant * (len(vset.variants) - 1)
            bar.refresh()
        measured.append(r)
    return measured


def run_worker(variant: Variant, spec: WorkerSpec, bar: tqdm) -> dict[str, Any]:
    """Run ``bench.worker`` on one variant in a fresh process; advance ``bar`` as it reports progress."""
    bar.set_postfix_str(variant.label)
    with (
        tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as err,
        subprocess.Popen(
            [sys.executable, "-m", "edgellm.bench.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        ) as proc,
    ):
        assert proc.stdin and proc.stdout
        try:
            proc.stdin.write(json.dumps(asdict(spec)))
            proc.stdin.close()
            result, failure = read_worker_events(proc.stdout, variant.label, bar)
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
        if rc == -signal.SIGSEGV and spec.repack:
            hint = "; llama.cpp crashed: some builds segfault in their AMX/repacked CPU kernels, try --no-repack"
        raise BenchError(f"measuring {variant.label} ({variant.path.name}) failed ({how}){hint}\n{tail}".rstrip())
    return result


def read_worker_events(
    lines: Iterable[str], label: str, bar: tqdm
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The worker's ``result`` and ``error`` events (None when it sent none); ``progress`` advances ``bar``."""
    result: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None
    for line in lines:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            log.debug("worker: %s", line.rstrip())
            continue
        kind = event.pop("event", None)
        if kind == "progress":
            bar.update(1)
            bar.set_postfix_str(f"{label}: {event.get('step', '')}")
        elif kind == "result":
            result = event
        elif kind == "error":
            failure = event
    return result, failure


# -- 3. verify ------------------------------------------------------------------------------------------------------
def verify_measurements(vset: VariantSet, measured: list[dict[str, Any]]) -> None:
    """Every variant scored as many chunks and tokens as the reference (the table states one count for all)."""
    ref = measured[0]
    for variant, r in zip(vset.variants[1:], measured[1:], strict=True):
        got = (r["n_chunks"], r["quality"]["n_scored"])
        want = (ref["n_chunks"], ref["quality"]["n_scored"])
        if got != want:
            raise BenchError(
                f"{variant.label} scored {got[1]} tokens in {got[0]} chunk(s), the reference {vset.reference.label} "
                f"{want[1]} in {want[0]}: the variants were not measured on the same text"
            )


# -- 4. save --------------------------------------------------------------------------------------------------------
def variant_result(variant: Variant, is_reference: bool, r: dict[str, Any]) -> VariantResult:
    """One row of the report from the worker's result."""
    return VariantResult(
        label=variant.label,
        quant=variant.quant,
        path=str(variant.path),
        is_reference=is_reference,
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


def system_info() -> dict[str, Any]:
    """The machine and the llama.cpp binding, for the report's header."""
    try:
        binding = version("llama_cpp_python")
    except PackageNotFoundError:
        binding = "unknown"
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "physical_cpus": physical_cores(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "llama_cpp_python": binding,
        "python": platform.python_version(),
    }


def save_report(report: QuantReport, out: Path) -> None:
    """``results.md``, ``chart.png`` and ``results.json`` in ``out``; ``report.files`` says where."""
    out.mkdir(parents=True, exist_ok=True)
    report.files = {"json": str(out / "results.json"), "table": str(out / "results.md"), "chart": str(out / "chart.png")}
    atomic_write_text(out / "results.md", quant_table(report))
    quant_chart(report, out / "chart.png")
    atomic_write_text(out / "results.json", report.to_json())
