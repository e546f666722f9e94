"""`edgellm bench quant|serve|engines|grammar|jump-forward|rerank|embed|soak`: a thin layer over `bench.quant.bench_quant`,
`bench.loadtest.bench_serve`, `bench.engine_speed.compare_engines`, `bench.grammar_speed.compare_grammar_speed`,
`bench.jump_forward.bench_jump_forward`,
`bench.retrieval_speed.bench_retrieval` and `bench.soak.bench_soak`.

edgellm bench quant models/demo/ --out reports/demo/
edgellm bench serve --url http://127.0.0.1:8000 --concurrency 1,2,4,8 --requests 32 --out reports/serve/
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,4,8, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark quantization variants, or load-test a server")
    bsub = p.add_subparsers(dest="bench_cmd", required=True)

    q = bsub.add_parser(
        "quant",
        help="compare GGUF variants on size, speed and quality (KL divergence vs the 16-bit reference)",
        description="For each GGUF variant in a manifest folder (models/<name>/) or a folder of .gguf files: size, "
        "bits per weight, load time, peak RSS, pp/tg tokens/s (llama-bench protocol) and perplexity, KL divergence "
        "and top-1 agreement against the reference (llama-perplexity --kl-divergence). Writes results.json, "
        "results.md and chart.png.",
    )
    q.add_argument("src", type=Path, help="models/<name>/ (with manifest.json) or a folder of .gguf files")
    q.add_argument("--out", type=Path, required=True, help="report folder, e.g. reports/<name>/")
    q.add_argument("--text", type=Path, default=None, help="held-out UTF-8 text (default: bench/data/heldout.txt)")
    q.add_argument("--threads", type=int, default=None, help="threads (default: physical cores)")
    q.add_argument("--reps", type=int, default=5, help="repetitions of each speed test (default: 5)")
    q.add_argument("--n-prompt", type=int, default=512, help="prompt tokens for pp (default: 512)")
    q.add_argument("--n-gen", type=int, default=128, help="generated tokens for tg (default: 128)")
    q.add_argument("--ctx", type=int, default=512, help="chunk size of the quality test (default: 512)")
    q.add_argument("--chunks", type=int, default=None, help="use at most this many chunks of the text")
    q.add_argument("--reference", default=None, help="reference variant in a folder without a manifest")
    q.add_argument(
        "--no-repack", dest="repack", action="store_false",
        help="disable llama.cpp's repacked/AMX CPU weight layouts (for builds that crash in them)",
    )
    q.set_defaults(func=_quant)

    s = bsub.add_parser(
        "serve",
        help="load-test an OpenAI-compatible server on this machine (streaming chat)",
        description="Streaming chat requests to a loopback URL at each concurrency level: TTFT and inter-token "
        "latency p50/p95, aggregate completion tokens/s, errors by kind.",
    )
    s.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (loopback only)")
    s.add_argument("--concurrency", type=_int_list, default=[1, 2, 4, 8], help="levels, e.g. 1,2,4,8")
    s.add_argument("--requests", type=int, default=16, help="requests per concurrency level (default: 16)")
    s.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (default: 64)")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default: 60)")
    s.add_argument("--max-seconds", type=float, default=600.0, help="seconds for the whole run (default: 600)")
    s.add_argument("--model", default=None, help="model id (default: the server's first /v1/models id)")
    s.add_argument("--out", type=Path, default=None, help="report folder for JSON, Markdown and PNG")
    s.set_defaults(func=_serve)

    e = bsub.add_parser(
        "engines",
        help="raw llama.cpp decode vs our engines (and llama-server) at 1, 2, 4 concurrent streams, in one run",
        description="Raw batch-1 llama_decode speed before and after; each engine behind a real `edgellm serve` on a "
        "loopback port (or in-process with --mode engine), streamed chat answers at each level of concurrency, the "
        "engines taking turns round by round. --llama-server adds llama.cpp's own server with the same model, "
        "threads, slots and per-slot context. Prints a Markdown table; --out also writes JSON and a chart.",
    )
    e.add_argument("--model", type=Path, default=Path("models/SmolLM2-135M-Instruct.Q4_1.gguf"), help="a GGUF file")
    e.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default: 2)")
    e.add_argument("--tokens", type=int, default=128, help="tokens per answer (default: 128)")
    e.add_argument("--rounds", type=int, default=3, help="rounds per level; one stream: twice as many (default: 3)")
    e.add_argument("--levels", type=_int_list, default=[1, 2, 4], help="concurrent streams (default: 1,2,4)")
    e.add_argument("--engines", default="serial,batched", help="edgellm engines (default: serial,batched)")
    e.add_argument("--mode", choices=["http", "engine"], default="http", help="real servers, or engines in-process")
    e.add_argument("--cold", action="store_true", help="no prefix shared between requests (TTFT = whole prompt)")
    e.add_argument("--llama-server", type=Path, default=None, help="also run this llama-server binary (http mode)")
    e.add_argument("--out", type=Path, default=None, help="folder for engines.json, engines.md and engines.png")
    e.set_defaults(func=_engines)

    g = bsub.add_parser(
        "grammar",
        help="decode speed with a JSON-schema grammar (small and large schema) vs the same requests without",
        description="The batched engine in-process on one model: the same chat requests with no grammar, a small "
        "and a large JSON schema, the variants taking turns round by round at each level of concurrency. Prints "
        "decode tok/s and the ratio to no grammar; --out also writes JSON, Markdown and a chart.",
    )
    g.add_argument("--model", type=Path, default=Path("models/SmolLM2-135M-Instruct.Q4_1.gguf"), help="a GGUF file")
    g.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default: 2)")
    g.add_argument("--tokens", type=int, default=96, help="max_tokens per answer (default: 96)")
    g.add_argument("--rounds", type=int, default=3, help="rounds per level (default: 3)")
    g.add_argument("--streams", type=_int_list, default=[1, 4], help="concurrent streams (default: 1,4)")
    g.add_argument("--out", type=Path, default=None, help="folder for grammar.json, grammar.md and grammar.png")
    g.set_defaults(func=_grammar)

    j = bsub.add_parser(
        "jump-forward",
        help="jump-forward on the extraction workload against drafting off, n-gram drafts, and its ceilings",
        description="The batched engine in-process, one stream, the extraction requests of the shipped workload "
        "set: drafting off, n-gram drafts only, jump-forward in the tokenizer's tokens, jump-forward as shipped "
        "(the model's spellings) on a schema never seen and on a request answered before, and two oracles that know "
        "the answers (the forced text in the model's tokens; every token the grammar determines). Prints tok/s and "
        "ratios; --out also writes JSON, Markdown and a chart.",
    )
    j.add_argument("--model", type=Path, default=Path("models/SmolLM2-135M-Instruct.Q4_1.gguf"), help="a GGUF file")
    j.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default: 2)")
    j.add_argument("--rounds", type=int, default=3, help="rounds; the first learns and is not counted (default: 3)")
    j.add_argument("--requests", type=int, default=16, help="extraction requests of the set to use (default: 16)")
    j.add_argument("--out", type=Path, default=None, help="folder for jump-forward.json, .md and .png")
    j.set_defaults(func=_jump_forward)

    for kind, what in (("rerank", "/v1/rerank"), ("embed", "/v1/embeddings")):
        r = bsub.add_parser(
            kind,
            help=f"{what}: the llama.cpp GGUF backend vs sentence-transformers (speed, start-up, RSS, chat beside it)",
            description=f"Each backend of {what} behind its own real `edgellm serve` on a loopback port, one after the "
            "other: start-up to ready, documents/s and latency over batches of general-domain passages, peak RSS, and "
            "chat decode speed alone and while retrieval requests run alongside. --out writes JSON, Markdown, a chart.",
        )
        r.add_argument("--gguf", type=Path, default=None, help="the llama.cpp model (default: the pulled GGUF)")
        r.add_argument("--st", type=Path, default=None, help="the sentence-transformers directory (default: the shipped one)")
        r.add_argument("--chat-model", type=Path, default=Path("models/SmolLM2-135M-Instruct.Q4_1.gguf"), help="a GGUF")
        r.add_argument("--requests", type=int, default=20, help="measured requests per backend (default: 20)")
        r.add_argument("--batch", type=int, default=32, help="documents per request (default: 32)")
        r.add_argument("--threads", type=int, default=1, help="retrieval threads (default: 1)")
        r.add_argument("--chat-tokens", type=int, default=128, help="tokens of the chat answer measured (default: 128)")
        r.add_argument("--out", type=Path, default=None, help=f"folder for {kind}.json, {kind}.md and {kind}.png")
        r.set_defaults(func=_retrieval, kind=kind)

    rt = bsub.add_parser(
        "routing",
        help="persona routing accuracy on a labelled set: keywords, embeddings, hybrid (confusion, latency)",
        description="Routes each labelled message (default: bench/data/routing.jsonl) with each method the personas "
        "of --config allow (embeddings and hybrid with the packaged MiniLM GGUF or --embedder); prints accuracy per "
        "method and kind, the confusion table and routing latency p50/p95. --out writes routing.json and routing.md.",
    )
    rt.add_argument("--config", type=Path, required=True, help="a train recipe, an adapters folder or a serve YAML")
    rt.add_argument("--data", type=Path, default=None, help="labelled JSONL (default: bench/data/routing.jsonl)")
    rt.add_argument("--embedder", type=Path, default=None, help="an embedding GGUF (default: the packaged MiniLM)")
    rt.add_argument("--no-embedder", dest="use_embedder", action="store_false", help="keywords only")
    rt.add_argument("--default", default=None, help="the fallback persona (default: the config's, else the first)")
    rt.add_argument("--out", type=Path, default=None, help="folder for routing.json and routing.md")
    rt.set_defaults(func=lambda a: _print_report(*_routing(a)))

    k = bsub.add_parser(
        "soak",
        help="minutes of mixed traffic against one server: its RSS and file descriptors over time, errors, p95",
        description="Streams, non-streamed chats, streams dropped after their first token, malformed bodies, rerank "
        "and embeddings requests, drawn at random (seeded) by --concurrency clients for --minutes, against --url or a "
        "server started here on loopback; samples the server's RSS, open file descriptors and threads. Reports "
        "outcomes by kind, p95 latency and RSS growth after warm-up; --out writes soak.json, soak.md and soak.png.",
    )
    k.add_argument("--minutes", type=float, default=20.0, help="length of the run (default: 20)")
    k.add_argument("--url", default=None, help="a running server on loopback (default: start one)")
    k.add_argument("--pid", type=int, default=None, help="its process id (default: the one listening on its port)")
    k.add_argument("--chat-model", type=Path, default=Path("models/SmolLM2-135M-Instruct.Q4_1.gguf"), help="a GGUF")
    k.add_argument("--threads", type=int, default=None, help="decoding threads of a server started here")
    k.add_argument("--concurrency", type=int, default=4, help="clients sending requests back to back (default: 4)")
    k.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each chat request (default: 32)")
    k.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples (default: 5)")
    k.add_argument("--warmup", type=float, default=0.2, help="fraction of the run before RSS is compared (default: 0.2)")
    k.add_argument("--out", type=Path, default=None, help="folder for soak.json, soak.md and soak.png")
    k.set_defaults(func=_soak)

    from edgellm.bench.ondemand import add_arguments as ondemand_arguments

    ondemand_arguments(bsub.add_parser(
        "ondemand",
        help="models from a folder loaded on demand: cold time to first token, decode beside a load, RSS after unload",
        description="A real `edgellm serve --models-dir` over two GGUFs on loopback: time to first token of a model "
        "not loaded, a loaded model's decode tok/s while another loads vs alone, the server's RSS before and after "
        "keep_alive 0 unloads a model. Prints a table; --out writes ondemand.json, ondemand.md and ondemand.png.",
    ))

    from edgellm.bench.personas import add_arguments as personas_arguments

    personas_arguments(bsub.add_parser(
        "personas",
        help="personas as LoRA adapters on one base vs merged GGUFs: aggregate tok/s and server memory",
        description="Real servers, one per configuration: N concurrent greedy streams on the base, on one persona, "
        "on N personas (N adapters on one base) and on N merged GGUFs (copies of the base file). Prints a table; "
        "--out writes personas.json, personas.md and personas.png.",
    ))

    from edgellm.bench.workloads import add_workloads_parser  # options beside the benchmark; no heavy imports

    add_workloads_parser(bsub, _int_list, _print_report)


def _quant(args: argparse.Namespace) -> int:
    from edgellm.bench.quant import bench_quant

    report = bench_quant(
        src=args.src,
        out=args.out,
        text=args.text,
        threads=args.threads,
        reps=args.reps,
        n_prompt=args.n_prompt,
        n_gen=args.n_gen,
        n_ctx=args.ctx,
        max_chunks=args.chunks,
        reference=args.reference,
        repack=args.repack,
    )
    return _print_report(Path(report.files["table"]).read_text(encoding="utf-8"), report.files)


def _serve(args: argparse.Namespace) -> int:
    import logging

    from edgellm.bench.loadtest import bench_serve
    from edgellm.bench.report import serve_table

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request drowns the report

    report = bench_serve(
        url=args.url,
        concurrency=args.concurrency,
        requests=args.requests,
        max_tokens=args.max_tokens,
        timeout=args.timeout,
        max_seconds=args.max_seconds,
        model=args.model,
        out=args.out,
    )
    return _print_report(serve_table(report), report.files)


def _engines(args: argparse.Namespace) -> int:
    from edgellm.bench.engine_speed import compare_engines
    from edgellm.bench.report import engines_table

    result = compare_engines(
        model=args.model,
        engines=[e for e in args.engines.split(",") if e],
        levels=args.levels,
        threads=args.threads,
        n_tokens=args.tokens,
        rounds=args.rounds,
        mode=args.mode,
        cold=args.cold,
        llama_server=args.llama_server,
        out=args.out,
    )
    return _print_report(engines_table(result), result.files)


def _grammar(args: argparse.Namespace) -> int:
    from edgellm.bench.grammar_speed import compare_grammar_speed, grammar_table

    result = compare_grammar_speed(
        model=args.model,
        threads=args.threads,
        n_tokens=args.tokens,
        rounds=args.rounds,
        streams=args.streams,
        out=args.out,
    )
    return _print_report(grammar_table(result), result.files)


def _jump_forward(args: argparse.Namespace) -> int:
    from edgellm.bench.jump_forward import bench_jump_forward, jump_forward_table

    result = bench_jump_forward(
        model=args.model, threads=args.threads, rounds=args.rounds, requests=args.requests, out=args.out
    )
    return _print_report(jump_forward_table(result), result.files)


def _retrieval(args: argparse.Namespace) -> int:
    from edgellm.bench.retrieval_speed import bench_retrieval, default_models, table

    models = default_models(args.kind)
    if args.gguf is not None:
        models["llama.cpp"] = args.gguf
    if args.st is not None:
        models["sentence-transformers"] = args.st
    result = bench_retrieval(
        args.kind,
        models=models,
        chat_model=args.chat_model,
        requests=args.requests,
        batch=args.batch,
        threads=args.threads,
        chat_tokens=args.chat_tokens,
        out=args.out,
    )
    return _print_report(table(result), result.files)


def _soak(args: argparse.Namespace) -> int:
    import logging

    from edgellm.bench.soak import bench_soak, table

    logging.getLogger("httpx").setLevel(logging.WARNING)
    result = bench_soak(
        minutes=args.minutes,
        url=args.url,
        pid=args.pid,
        chat_model=args.chat_model,
        threads=args.threads,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        sample_s=args.sample_s,
        warmup=args.warmup,
        out=args.out,
    )
    return _print_report(table(result), result.files)


def _routing(args: argparse.Namespace) -> tuple[str, dict[str, str]]:
    from edgellm.bench.routing import bench_routing, table

    result = bench_routing(
        args.config, data=args.data, embedder=args.embedder, use_embedder=args.use_embedder, default=args.default,
        out=args.out,
    )
    return table(result), result.files


def _print_report(table: str, files: dict[str, str]) -> int:
    """The table, then where each written file is."""
    print(table)
    for kind, path in files.items():
        print(f"{kind}: {path}")
    return 0
