"""`edgellm convert`: a thin layer over `convert.recipe.convert_model` and `convert.llamacpp.setup_converter`.

edgellm convert setup                                   # fetch llama.cpp's converter into the cache (idempotent)
edgellm convert runs/demo/merged --quant q4_k_m q8_0 --out models/demo/
"""

from __future__ import annotations

import argparse
from pathlib import Path

QUANT_CHOICES = ("q4_k_m", "q8_0", "q5_k_m", "q6_k", "q4_0", "f16", "bf16")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a Hugging Face model directory to verified GGUF files with a manifest",
        description="Convert a Hugging Face causal-LM directory to GGUF with llama.cpp's converter, quantize it with "
        "llama.cpp's quantizer, verify every file and write <out>/manifest.json. `edgellm convert setup` only fetches "
        "the converter (pass ./setup for a model directory of that name).",
    )
    p.add_argument(
        "src", metavar="HF_MODEL_DIR|setup", help="model directory (config.json + safetensors), or `setup`"
    )
    p.add_argument(
        "--quant", nargs="+", default=["q4_k_m", "q8_0"], choices=QUANT_CHOICES, help="types to make"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="output folder (default: models/<source folder name>)"
    )
    p.add_argument(
        "--name", default=None, help="model name in the manifest (default: the output folder's name)"
    )
    p.add_argument(
        "--base-type", default="f16", choices=("f16", "bf16"), help="16-bit type from the converter"
    )
    p.add_argument("--max-kl", type=float, default=1e-3, help="round-trip gate: mean KL(hf || 16-bit gguf)")
    p.add_argument("--threads", type=int, default=None, help="threads for quantization and verification")
    p.add_argument(
        "--imatrix-text",
        type=Path,
        default=None,
        help="calibration text (.txt, or .jsonl whose strings are used) for an importance matrix; default: none",
    )
    p.add_argument(
        "--force", action="store_true", help="redo every output even if its recorded sha256 matches"
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.src == "setup":
        from convert.llamacpp import setup_converter

        converter = setup_converter(force=args.force)
        print(f"llama.cpp converter {converter.version}: {converter.root}")
        return 0

    from convert.recipe import convert_model
    from edgellm.paths import models_dir

    src = Path(args.src)
    out = args.out or models_dir() / src.resolve().name
    manifest = convert_model(
        src,
        out,
        quants=args.quant,
        name=args.name,
        base_type=args.base_type,
        max_kl=args.max_kl,
        threads=args.threads,
        force=args.force,
        imatrix_text=args.imatrix_text,
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
    return 0
