"""Markdown tables and PNG charts of the bench results (``bench/results.py``); matplotlib, headless."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgellm.bench.charts import save_png, subplots
from edgellm.bench.results import EngineComparison, QuantReport, ServeReport
from edgellm.bench.tables import markdown_table


def _f(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _speed(s: dict[str, Any]) -> str:
    return f"{s['median_ts']:.1f} ± {s['stdev_ts']:.1f}"


def quant_table(report: QuantReport) -> str:
    sys_ = report.system
    lines = [
        f"# Quantization variants of {report.model}",
        "",
        f"Reference: **{report.reference}**"
        + ("" if report.reference_is_float else " (not a float file: quality is relative to it)")
        + f". Quality on {report.text}: {report.n_chunks} chunk(s) of {report.n_ctx} tokens, second half of each "
        f"scored. Speed: median ± stdev over {report.reps} rep(s) after a warm-up, {report.threads} thread(s), "
        f"llama.cpp CPU backend (llama-cpp-python {sys_.get('llama_cpp_python')}"
        + ("" if report.repack else ", repacked/AMX weights off")
        + f"), {sys_.get('physical_cpus')} physical / {sys_.get('logical_cpus')} logical CPUs. "
        "Peak RSS is the whole measuring process (Python + llama.cpp + model); load time with mmap.",
        "",
    ]
    rows = []
    for v in report.variants:
        q = v.quality
        if v.is_reference:
            quality = [f"{q['ppl']:.3f}", "reference", "–", "–", "–"]
        else:
            quality = [
                f"{q['ppl']:.3f}",
                f"{q['ln_ppl_ratio']:+.4f}",
                f"{q['kld_mean']:.5f} ± {q['kld_mean_unc']:.5f}",
                f"{q['kld_p99']:.4f}",
                f"{100 * q['top1_agreement']:.1f}%",
            ]
        rows.append(
            [
                v.label,
                v.quant,
                f"{v.size_bytes / 2**20:.1f}",
                f"{v.bits_per_weight:.2f}",
                f"{v.load_s:.2f}",
                f"{v.peak_rss_mib:.0f}",
                _speed(v.pp),
                _speed(v.tg),
                *quality,
            ]
        )
    lines += markdown_table(
        ["variant", "type", "size MiB", "BPW", "load s", "peak RSS MiB", f"pp{report.n_prompt} t/s",
         f"tg{report.n_gen} t/s", "PPL", "ln(PPL/PPL ref)", "mean KLD", "p99 KLD", "top-1 agree"],
        "ll" + "r" * 11,
        rows,
    )
    n_scored = report.variants[0].quality["n_scored"]
    lines += ["", f"{n_scored} scored tokens; {report.n_text_tokens} tokens in the text.", ""]
    return "\n".join(lines)


def quant_chart(report: QuantReport, path: Path) -> None:
    """Left: mean and p99 KL divergence vs size on disk; right: pp and tg tokens/s per variant (median, stdev)."""
    fig, (ax_q, ax_pp, ax_tg) = subplots(1, 3, figsize=(15, 4.5))
    for v in report.variants:
        size = v.size_bytes / 2**20
        if v.is_reference:
            ax_q.axvline(size, color="tab:red", linestyle="--", linewidth=1)
            ax_q.annotate(f"{v.label} (reference)", (size, 0.5), xycoords=("data", "axes fraction"),
                          rotation=90, ha="right", va="center", fontsize=9, color="tab:red")
            continue
        mean, p99 = v.quality["kld_mean"], v.quality["kld_p99"]
        ax_q.scatter(size, mean, s=40, color="tab:blue", label="mean KLD" if not ax_q.collections else None)
        ax_q.scatter(size, p99, s=40, marker="x", color="tab:purple",
                     label="p99 KLD" if len(ax_q.collections) == 1 else None)
        ax_q.annotate(v.label, (size, mean), textcoords="offset points", xytext=(6, 4), fontsize=9)
    if ax_q.collections:
        positive = all(v.quality["kld_mean"] > 0 for v in report.variants if not v.is_reference)
        if positive:
            ax_q.set_yscale("log")
        else:  # a variant identical to the reference has KLD 0
            ax_q.set_yscale("symlog", linthresh=1e-6)
        ax_q.legend(loc="upper right")
    ax_q.set_xlabel("size on disk (MiB)")
    ax_q.set_ylabel(f"KL divergence vs {report.reference} (nats)")
    ax_q.set_title("quality loss vs size")
    ax_q.grid(alpha=0.3)

    labels = [v.label for v in report.variants]
    for ax, key, title in ((ax_pp, "pp", f"prompt processing (pp{report.n_prompt})"),
                           (ax_tg, "tg", f"generation (tg{report.n_gen})")):
        med = [getattr(v, key)["median_ts"] for v in report.variants]
        err = [getattr(v, key)["stdev_ts"] for v in report.variants]
        ax.bar(labels, med, yerr=err, capsize=4, color="tab:green" if key == "pp" else "tab:orange")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{title}, {report.threads} thread(s)")
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{report.model}: quantization variants")
    fig.tight_layout()
    save_png(fig, path, dpi=120)


def _ms(x: float | None) -> str:
    return _f(None if x is None else 1000 * x, ".1f")


def serve_table(report: ServeReport) -> str:
    lines = [
        f"# Load test of {report.url}",
        "",
        f"Model `{report.model}`; {report.requests} streaming chat request(s) per concurrency level, max_tokens "
        f"{report.max_tokens}, temperature 0; per-request timeout {report.timeout_s:g} s. Completion tokens from the "
        "server's usage chunk when it sends one, else counted as content chunks. Inter-token latency is the gap "
        "between content chunks.",
        "",
        *markdown_table(
            ["concurrency", "ok", "errors", "TTFT p50 ms", "TTFT p95 ms", "ITL p50 ms", "ITL p95 ms", "latency p50 s",
             "completion tokens", "tokens/s (aggregate)", "wall s"],
            "rrl" + "r" * 8,
            (
                [str(lv.concurrency), f"{lv.ok}/{lv.requests}",
                 ", ".join(f"{k}: {n}" for k, n in sorted(lv.errors.items())) or "0",
                 _ms(lv.ttft_p50_s), _ms(lv.ttft_p95_s), _ms(lv.itl_p50_s), _ms(lv.itl_p95_s),
                 _f(lv.latency_p50_s, ".2f"), str(lv.completion_tokens), f"{lv.tokens_per_s:.1f}", f"{lv.wall_s:.2f}"]
                for lv in report.levels
            ),
        ),
        "",
    ]
    return "\n".join(lines)


def serve_chart(report: ServeReport, path: Path) -> None:
    """Left: TTFT and ITL percentiles vs concurrency; right: aggregate completion tokens/s vs concurrency."""
    conc = [lv.concurrency for lv in report.levels]
    fig, (ax_l, ax_t) = subplots(1, 2, figsize=(11, 4.5))
    for attr, style, name in (
        ("ttft_p50_s", "o-", "TTFT p50"),
        ("ttft_p95_s", "o--", "TTFT p95"),
        ("itl_p50_s", "s-", "ITL p50"),
        ("itl_p95_s", "s--", "ITL p95"),
    ):
        ys = [getattr(lv, attr) for lv in report.levels]
        pts = [(c, 1000 * y) for c, y in zip(conc, ys, strict=True) if y is not None]
        if pts:
            ax_l.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
    ax_l.set_xlabel("concurrency")
    ax_l.set_ylabel("ms")
    ax_l.set_xticks(conc)
    ax_l.set_title("latency")
    ax_l.grid(alpha=0.3)
    if ax_l.get_lines():
        ax_l.legend()
    else:
        ax_l.text(0.5, 0.5, "no successful requests", ha="center", va="center", transform=ax_l.transAxes)
    ax_t.plot(conc, [lv.tokens_per_s for lv in report.levels], "o-", color="tab:green")
    ax_t.set_xlabel("concurrency")
    ax_t.set_ylabel("completion tokens/s")
    ax_t.set_xticks(conc)
    ax_t.set_ylim(bottom=0)
    ax_t.set_title("aggregate throughput")
    ax_t.grid(alpha=0.3)
    fig.suptitle(f"{report.url} ({report.model})")
    fig.tight_layout()
    save_png(fig, path, dpi=120)


def engines_table(r: EngineComparison) -> str:
    tg, pp_ms = r.raw_tg, r.raw_prompt_ms
    lines = [
        f"model {Path(r.model).name}, {r.threads} threads, {r.n_tokens}-token answers, mode {r.mode}, "
        f"{'cold prompts' if r.cold else 'shared system prompt'}",
        "",
        f"raw batch-1 llama_decode: tg{r.n_tokens} {r.raw_before['tg']:.1f} tok/s before, {r.raw_after['tg']:.1f} "
        f"after (mean {tg:.1f}); pp512 {r.raw_before['pp512']:.0f} tok/s; the chat prompt ({r.prompt_tokens} "
        f"tokens) in {pp_ms:.1f} ms",
        "",
        *markdown_table(
            ["engine", "streams", "aggregate tok/s", "x raw tg", "per-stream tok/s", "TTFT p50 ms", "TTFT p95 ms"],
            "l" + "r" * 6,
            [
                ["raw llama_decode", "1", f"{tg:.1f}", "1.00", f"{tg:.1f}", f"{pp_ms:.1f}", None],
                *(
                    [engine, str(x.streams), f"{x.aggregate:.1f}", f"{x.aggregate / tg:.2f}", f"{x.per_stream:.1f}",
                     f"{x.ttft_p50:.1f}", f"{x.ttft_p95:.1f}"]
                    for engine, levels in r.rows.items()
                    for x in levels
                ),
            ],
            right="---:",
        ),
    ]
    return "\n".join(lines) + "\n"


def engines_chart(result: EngineComparison, path: Path) -> None:
    """Left: aggregate tokens/s vs concurrent streams per engine, the raw batch-1 decode speed as a line;
    right: TTFT p50 (bars) and p95 (whiskers) per engine and level."""
    fig, (ax_t, ax_l) = subplots(1, 2, figsize=(11, 4.5))
    engines = list(result.rows)
    for name in engines:
        levels = result.rows[name]
        ax_t.plot([x.streams for x in levels], [x.aggregate for x in levels], "o-", label=name)
    ax_t.axhline(result.raw_tg, color="grey", linestyle="--", label=f"raw decode ({result.raw_tg:.0f} tok/s)")
    streams = sorted({x.streams for levels in result.rows.values() for x in levels})
    ax_t.set_xticks(streams)
    ax_t.set_xlabel("concurrent streams")
    ax_t.set_ylabel("aggregate completion tokens/s")
    ax_t.set_ylim(bottom=0)
    ax_t.set_title("throughput")
    ax_t.grid(alpha=0.3)
    ax_t.legend()
    width = 0.8 / max(1, len(engines))
    for k, name in enumerate(engines):
        by = {x.streams: x for x in result.rows[name]}
        xs = [i + (k - (len(engines) - 1) / 2) * width for i, n in enumerate(streams) if n in by]
        p50 = [by[n].ttft_p50 for n in streams if n in by]
        p95 = [by[n].ttft_p95 for n in streams if n in by]
        ax_l.bar(xs, p50, width, label=name)
        ax_l.errorbar(xs, p50, yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p95, strict=True)]], fmt="none",
                      ecolor="black", capsize=3)  # fmt: skip
    ax_l.axhline(result.raw_prompt_ms, color="grey", linestyle="--", label="raw prompt processing")
    ttfts = [v for levels in result.rows.values() for x in levels for v in (x.ttft_p50, x.ttft_p95) if v > 0]
    if ttfts and max(ttfts) > 20 * min(ttfts):  # a queueing engine's seconds would flatten everyone else's ms
        ax_l.set_yscale("log")
    ax_l.set_xticks(range(len(streams)), [str(n) for n in streams])
    ax_l.set_xlabel("concurrent streams")
    ax_l.set_ylabel("time to first token, ms (p50, whisker p95)")
    ax_l.set_title("latency")
    ax_l.grid(alpha=0.3, axis="y")
    ax_l.legend()
    prompts = "cold prompts" if result.cold else "shared system prompt"
    fig.suptitle(f"{Path(result.model).name}: {result.threads} threads, {result.n_tokens}-token answers, {prompts}")
    fig.tight_layout()
    save_png(fig, path, dpi=120)
