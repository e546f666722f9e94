"""`edgellm convert`: a thin layer over `convert.recipe.convert_model`, `convert.encoder.convert_encoder` and
`convert.llamacpp.setup_converter`.

edgellm convert setup                                   # fetch llama.cpp's converter into the cache (idempotent)
edgellm convert runs/demo/merged --quant q4_k_m q8_0 --out models/demo/
edgellm convert --config configs/convert.yaml            # the same, from a YAML that mirrors convert_model
edgellm convert models/reranker-minilm-l6 --out models/reranker-minilm-l6-gguf   # an encoder: f16 + parity.json
edgellm convert --lora runs/personas --base-gguf models/SmolLM2-135M-Instruct.Q4_1.gguf --out models/personas
                                                        # LoRA adapters as GGUF + adapters.json (`convert.adapter`)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a Hugging Face model directory to verified GGUF files with a manifest",
        description="Convert a Hugging Face causal-LM directory to GGUF with llama.cpp's converter, quantize it with "
        "llama.cpp's quantizer, verify every file and write <out>/manifest.json. `edgellm convert setup` only fetches "
        "the converter (pass ./setup for a model directory of that name).",
    )
    p.add_argument(
        "src",
        nargs="?",
        metavar="HF_MODEL_DIR|setup",
        help="model directory (config.json + safetensors), or `setup`",
    )
    p.add_argument("--config", type=Path, default=None, help="settings YAML, e.g. configs/convert.yaml")
    p.add_argument(
        "--quant",
        dest="quants",
        nargs="+",
        metavar="TYPE",
        help="llama.cpp types to make (q4_k_m q8_0; also q5_k_m, q6_k, q4_0, f16, bf16, ...)",
    )
    p.add_argument("--out", type=Path, help="output folder (default: models/<source folder name>)")
    p.add_argument("--name", help="model name in the manifest (default: the output folder's name)")
    p.add_argument("--base-type", choices=("f16", "bf16"), help="16-bit type from the converter (f16)")
    p.add_argument("--max-kl", type=float, help="round-trip gate: mean KL(hf || 16-bit gguf) (0.001)")
    p.add_argument("--threads", type=int, help="threads for quantization and verification")
    p.add_argument(
        "--imatrix-text", type=Path, help="calibration .txt/.jsonl for an importance matrix (none)"
    )
    p.add_argument(
        "--force", action="store_true", default=None, help="redo outputs even if their sha256 matches"
    )
    p.add_argument(
        "--check-behaviour",
        type=Path,
        metavar="RUN_DIR",
        help="after converting, run the train stage's behaviour check (runs/<name>: config.yaml + data/) on every "
        "variant through llama.cpp and write <out>/behaviour.json",
    )
    p.add_argument(
        "--behaviour-prompts", type=int, default=None, help="use at most this many held-out prompts"
    )
    lora = p.add_argument_group(
        "LoRA adapters (--lora)",
        "convert PEFT adapters to GGUF LoRA files for one base GGUF, each checked against the merged model, into "
        "<out>/adapters.json; --max-kl is then the adapter gate (0.001), --threads and --force apply",
    )
    lora.add_argument(
        "--lora",
        type=Path,
        metavar="ADAPTER|RUN",
        help="a PEFT adapter folder (runs/<name>/adapter) or a train run (every adapter in it)",
    )
    lora.add_argument("--base-gguf", type=Path, help="the base GGUF the adapters are applied to (served)")
    lora.add_argument(
        "--base", dest="base_hf", type=Path, help="the base's Hugging Face folder (default: the run's base_model)"
    )
    lora.add_argument(
        "--reference-gguf",
        type=Path,
        help="an f16/f32 GGUF of the base for the gate when --base-gguf is quantized (default: converted from --base)",
    )
    lora.add_argument("--lora-outtype", choices=("f16", "f32", "bf16", "q8_0"), default="f16", help="(f16)")
    lora.add_argument("--kl-prompts", type=int, default=16, help="held-out conversations for the KL check (16)")
    lora.add_argument(
        "--behaviour",
        action="store_true",
        help="then run each adapter's train-run behaviour check on the base GGUF + adapter in llama.cpp "
        "(--behaviour-prompts caps the prompts) and write <out>/behaviour.json",
    )
    p.set_defaults(func=_run)


_KEYS = ("src", "out", "quants", "name", "base_type", "max_kl", "threads", "imatrix_text", "force")


def _run(args: argparse.Namespace) -> int:
    # llama-cpp-python prints llama.cpp's own log (hundreds of lines per model loaded) unless its logger says not to.
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if getattr(args, "verbose", False) else logging.ERROR)
    if args.src == "setup":
        from edgellm.convert.llamacpp import setup_converter

        converter = setup_converter(force=bool(args.force))
        print(f"llama.cpp converter {converter.version}: {converter.root}")
        return 0

    if args.lora is not None:
        return _convert_lora(args)

    from edgellm.convert.llamacpp import ConvertError
    from edgellm.convert.recipe import convert_model
    from edgellm.convert.settings import load_convert_settings
    from edgellm.paths import models_dir, resolve_input

    overrides = {k: getattr(args, k) for k in _KEYS}
    overrides = {k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()}
    config = resolve_input(args.config) if args.config is not None else None
    settings = load_convert_settings(config, overrides)
    if settings.src is None:
        raise ConvertError("no model directory: pass HF_MODEL_DIR or a --config with `src:`")
    out = settings.out or models_dir() / resolve_input(settings.src).resolve().name
    if (kind := _encoder_kind(resolve_input(settings.src))) is not None:
        return _convert_encoder(settings, out, kind, quants_given=args.quants is not None)
    manifest = convert_model(
        settings.src,
        out,
        quants=settings.quants,
        name=settings.name,
        base_type=settings.base_type,
        max_kl=settings.max_kl,
        threads=settings.threads,
        force=settings.force,
        imatrix_text=settings.imatrix_text,
    )
    ref = manifest.reference
    kl = ref.verification.kl_mean if ref.verification else None
    print(f"{manifest.name}: reference {ref.path} (KL vs Hugging Face {kl:.2e})")
    for f in manifest.files:
        types = ", ".join(f"{k}:{v}" for k, v in f.tensor_types.items())
        print(
            f"  {manifest.model_id(f):<24} {f.path}  {f.size / 1e6:8.1f} MB  {f.bits_per_weight:5.2f} bpw  [{types}]"
        )
    print(f"manifest: {out / 'manifest.json'}")
    if args.check_behaviour is not None:
        from edgellm.convert.behaviour import behaviour_shares

        run = resolve_input(args.check_behaviour)
        shares = behaviour_shares(out, run, out / "behaviour.json", args.behaviour_prompts)
        for r in shares.values():
            print(
                f"  {r['model']:<24} behaviour pass share {r['pass_share']:.3f} over {r['prompts']} prompts"
            )
        print(f"behaviour: {out / 'behaviour.json'}")
    return 0


def _encoder_kind(src: Path) -> str | None:
    import json

    from edgellm.convert.encoder import encoder_kind

    config = src / "config.json"
    if not config.is_file():
        return None
    return encoder_kind(json.loads(config.read_text(encoding="utf-8")))


def _convert_encoder(settings: object, out: Path, kind: str, quants_given: bool) -> int:
    """An embedding model or cross-encoder: llama.cpp's converter writes each type itself (f16 by default), each
    checked against sentence-transformers (`convert.encoder`)."""
    from edgellm.convert.encoder import convert_encoder

    s: Any = settings
    record = convert_encoder(
        s.src,
        out,
        outtypes=s.quants if quants_given else ("f16",),
        name=s.name,
        threads=s.threads,
        force=bool(s.force),
    )
    print(f"{record.name}: {kind} from {record.source['path']} ({record.source['architecture']})")
    for f in record.files:
        figures = ", ".join(f"{k} {v:.6f}" if isinstance(v, float) else f"{k} {v}" for k, v in f.parity.items())
        print(f"  {f.path}  {f.size / 1e6:8.1f} MB  parity: {figures}")
    print(f"parity: {out / 'parity.json'}")
    return 0


def _convert_lora(args: argparse.Namespace) -> int:
    from edgellm.convert.adapter import MAX_ADAPTER_KL, convert_adapters
    from edgellm.convert.llamacpp import ConvertError
    from edgellm.paths import models_dir

    if args.src is not None:
        raise ConvertError("--lora converts adapters: give no HF_MODEL_DIR with it")
    if args.base_gguf is None:
        raise ConvertError("--lora needs --base-gguf: the base GGUF the adapters will be applied to")
    out = args.out or models_dir() / args.lora.resolve().name
    manifest = convert_adapters(
        args.lora,
        args.base_gguf,
        out,
        base_hf=args.base_hf,
        reference_gguf=args.reference_gguf,
        outtype=args.lora_outtype,
        max_kl=args.max_kl if args.max_kl is not None else MAX_ADAPTER_KL,
        max_prompts=args.kl_prompts,
        threads=args.threads,
        force=bool(args.force),
    )
    print(f"base {manifest.base.file_name} ({manifest.base.file_type}); gate on {manifest.reference_base.file_name}")
    for a in manifest.adapters:
        ref, served = a.verification.reference, a.verification.served
        line = (
            f"  {a.name:<12} {a.path}  {a.size / 1e6:6.1f} MB  r={a.rank} alpha={a.alpha:g}  "
            f"KL vs merged: {ref.kl_mean:.2e} mean, {ref.kl_p99:.2e} p99 ({manifest.reference_base.file_type})"
        )
        if served is not None:
            line += f"; {served.kl_mean:.2e} mean, {served.kl_p99:.2e} p99 ({manifest.base.file_type})"
        print(line)
    print(f"adapters: {out / 'adapters.json'}")
    if args.behaviour:
        from edgellm.convert.behaviour import adapter_behaviour_shares

        shares = adapter_behaviour_shares(out, out / "behaviour.json", args.behaviour_prompts, args.threads)
        for name, r in shares.items():
            print(f"  {name:<12} on {r['base']}: behaviour pass share {r['pass_share']:.3f} over {r['prompts']} prompts")
        print(f"behaviour: {out / 'behaviour.json'}")
    return 0
