"""`edgellm convert`: a thin layer over `convert.recipe.convert_model`, `convert.encoder.convert_encoder` and
`convert.llamacpp.setup_converter`.

edgellm convert setup                                   # fetch llama.cpp's converter into the cache (idempotent)
edgellm convert runs/demo/merged --quant q4_k_m q8_0 --out models/demo/
edgellm convert --config configs/convert.yaml            # the same, from a YAML that mirrors convert_model
edgellm convert models/reranker-minilm-l6 --out models/reranker-minilm-l6-gguf   # an encoder: f16 + parity.json
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
