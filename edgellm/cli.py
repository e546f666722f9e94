"""The `edgellm` console script: a thin layer over each stage's typed functions.

Each stage registers its own subcommand from ``<stage>/cli.py`` (``register(subparsers)``); those modules import
nothing heavy at module level, so `edgellm serve` never imports torch.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

from edgellm import __version__


def _models_list(args: argparse.Namespace) -> int:
    from edgellm.catalog import list_models

    rows = list_models()
    width = max(len(e.name) for e, _ in rows)
    for entry, present in rows:
        state = "present " if present else "pullable"
        print(f"{entry.name:<{width}}  {state}  models/{entry.path}  {entry.description}")
    return 0


def _models_pull(args: argparse.Namespace) -> int:
    from edgellm.catalog import pull

    for name in args.names:
        path = pull(name, force=args.force)
        print(f"{name}: {path}")
    return 0


def _register_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list and pull the models in models/catalog.yaml")
    msub = p.add_subparsers(dest="models_cmd", required=True)
    pl = msub.add_parser("list", help="show what is present and what can be pulled")
    pl.set_defaults(func=_models_list)
    pp = msub.add_parser("pull", help="materialize catalog entries into models/ (offline-safe, verified)")
    pp.add_argument("names", nargs="+", help="catalog names, e.g. default, base, reranker")
    pp.add_argument("--force", action="store_true", help="rebuild even if present")
    pp.set_defaults(func=_models_pull)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgellm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"edgellm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _register_models(sub)
    from edgellm.serve.cli import register as register_serve

    register_serve(sub)
    for module in ("edgellm.train.cli", "edgellm.convert.cli", "edgellm.bench.cli"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                continue  # stage not built yet
            raise
        mod.register(sub)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from edgellm.errors import UserFacingError

    if args.command == "bench":
        # a benchmark stopped with SIGTERM (`kill`, a CI timeout) unwinds like Ctrl-C, so the servers it started
        # are stopped by their context managers instead of left running
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return int(args.func(args) or 0)
    except UserFacingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
