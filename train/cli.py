"""`edgellm train ...`: a thin layer over train.qlora / data / merge / evaluate (and the reranker recipe).

Nothing heavy is imported here: each command imports its recipe when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from edgellm.config import ConfigError, parse_overrides


def _train(args: argparse.Namespace) -> int:
    if args.config is None:
        raise ConfigError("edgellm train: --config is required (for example configs/train/demo.yaml)")
    from edgellm.train.qlora import train

    folders = train(Path(args.config), parse_overrides(args.set))
    if os.environ.get("RANK", "0") == "0":  # under `accelerate launch`, every process returns; one reports
        for folder in folders:
            print(f"run: {folder}")
    return 0


def _check_data(args: argparse.Namespace) -> int:
    from edgellm.train.checks import check_data

    source = args.data_config or args.source
    if source is None:
        raise ConfigError("edgellm train check-data: give --config configs/train/<name>.yaml or a JSONL file")
    reports = check_data(Path(source), parse_overrides(args.set))
    bad = 0
    for path, report in reports.items():
        for issue in report.issues:
            print(issue)
        print(f"{path}: {report.summary()}")
        bad += len(report.issues)
    return 1 if bad else 0


def _merge(args: argparse.Namespace) -> int:
    from edgellm.train.merge import merge_run

    for report in merge_run(Path(args.run), base=args.base, dtype=args.dtype):
        print(json.dumps(report, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from edgellm.train.evaluate import evaluate_run

    for result in evaluate_run(Path(args.run), tuple(args.models)):
        for label, summary in result["models"].items():
            shown = {k: v for k, v in summary.items() if k != "answers"}
            print(f"{result['folder']} {label}: {json.dumps(shown)}")
    return 0


def _reranker(args: argparse.Namespace) -> int:
    from edgellm.train.reranker import train_reranker

    train_reranker(Path(args.rerank_config), parse_overrides(args.set))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="QLoRA fine-tuning from a YAML recipe, data checks, merge to a 16-bit model",
        description="Run a QLoRA recipe: edgellm train --config configs/train/demo.yaml [--set key=value ...]; "
        "on N processes: accelerate launch --multi_gpu --num_processes N -m edgellm train --config ...",
    )
    p.add_argument("--config", help="recipe YAML, e.g. configs/train/demo.yaml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    p.set_defaults(func=_train)
    sub = p.add_subparsers(dest="train_cmd")

    c = sub.add_parser(
        "check-data", help="validate a recipe's datasets (or one JSONL file); list every bad line"
    )
    c.add_argument("source", nargs="?", help="a JSONL data file (instead of --config)")
    c.add_argument(
        "--config", dest="data_config", help="recipe YAML whose datasets and data settings to check"
    )
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    c.set_defaults(func=_check_data)

    m = sub.add_parser("merge", help="merge a run's adapter into a 16-bit model (runs/<name>/merged)")
    m.add_argument("run", help="the run folder, e.g. runs/demo")
    m.add_argument(
        "--base", choices=["original", "dequantized"], help="merge into the original or dequant(NF4) base"
    )
    m.add_argument("--dtype", choices=["float16", "bfloat16"], help="the merged model's dtype")
    m.set_defaults(func=_merge)

    e = sub.add_parser(
        "eval",
        help="test loss, perplexity, ROUGE-L, BLEU and behaviour share, base vs merged (writes <run>/eval.json)",
    )
    e.add_argument("run", help="the run folder, e.g. runs/demo")
    e.add_argument(
        "--models",
        nargs="+",
        choices=["base", "merged"],
        default=["base", "merged"],
        help="which models to evaluate",
    )
    e.set_defaults(func=_eval)

    r = sub.add_parser("reranker", help="fine-tune the cross-encoder reranker")
    r.add_argument(
        "--config", dest="rerank_config", default="configs/train/reranker.yaml", help="reranker recipe YAML"
    )
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    r.set_defaults(func=_reranker)
