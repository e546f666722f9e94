"""`edgellm serve`: flags are generated from ServeSettings, so every setting has one (plus `--set a.b=c`)."""

from __future__ import annotations

import argparse
import logging
import types
import typing
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("configs/serve.yaml")
STARTUP_FAILURE = 3  # uvicorn's exit code when the server cannot start (port taken, lifespan failed)
_SCALARS = (str, int, float, bool)


def _is_scalar(ann: Any) -> bool:
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return True
    if origin in (typing.Union, types.UnionType):
        return all(_is_scalar(a) for a in typing.get_args(ann) if a is not type(None))
    return ann in _SCALARS


def _scalar_fields() -> list[tuple[str, str]]:
    """(name, help) for every top-level setting with a scalar value."""
    from edgellm.serve.settings import ServeSettings

    return [
        (name, info.description or "")
        for name, info in ServeSettings.model_fields.items()
        if _is_scalar(info.annotation)
    ]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve GGUF models over an OpenAI-compatible HTTP API")
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"settings YAML (default: {DEFAULT_CONFIG} in the current folder, else the one shipped with edgellm)",
    )
    p.add_argument(
        "--model",
        dest="model_paths",
        action="append",
        type=Path,
        metavar="PATH",
        help="serve this GGUF (or every variant of a convert manifest.json) instead of the configured models; repeatable",
    )
    p.add_argument(
        "--models-dir",
        type=Path,
        metavar="DIR",
        help="serve every GGUF and convert manifest under DIR, each loaded on its first request (instead of the "
        "configured models, unless --model is given too); files added later appear without a restart",
    )
    p.add_argument(
        "--reranker",
        type=Path,
        metavar="PATH",
        help="serve this cross-encoder at /v1/rerank: a .gguf (llama.cpp) or a sentence-transformers directory",
    )
    p.add_argument("--no-reranker", action="store_true", help="do not load the configured reranker")
    p.add_argument("--embedder", type=Path, metavar="GGUF", help="serve this embedding GGUF at /v1/embeddings")
    p.add_argument("--no-embedder", action="store_true", help="do not load the configured embedder")
    p.add_argument(
        "--personas",
        type=Path,
        metavar="DIR",
        help="serve every adapter of DIR/adapters.json (`edgellm convert --lora`) as a persona on its base GGUF "
        "(added to the models unless one is that file), with the profiles their train recipe gave them, and a "
        "keyword router `auto` unless routers are configured",
    )
    p.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="override any key, e.g. models.0.n_ctx=2048"
    )
    for name, help_text in _scalar_fields():
        p.add_argument(f"--{name.replace('_', '-')}", dest=f"opt_{name}", default=None, metavar="VALUE", help=help_text)
    p.set_defaults(func=_run)


def settings_from_args(args: argparse.Namespace) -> Any:
    from edgellm.config import parse_overrides, parse_scalar
    from edgellm.paths import resolve_input
    from edgellm.serve.settings import ModelSettings, load_serve_settings, models_from_paths

    config = args.config
    if config is None:
        default = resolve_input(DEFAULT_CONFIG)  # ./configs/serve.yaml, else the installed copy's
        if default.is_file():
            config = default
    overrides: dict[str, Any] = {}
    for name, _ in _scalar_fields():
        value = getattr(args, f"opt_{name}")
        if value is not None:
            overrides[name] = parse_scalar(value)
    if args.model_paths:
        template = ModelSettings.model_validate({"name": "x", "path": "x"})
        overrides["models"] = models_from_paths(args.model_paths, template)
    if args.models_dir:
        overrides["models_dir"] = str(args.models_dir)
        if not args.model_paths:
            overrides["models"] = []
    if args.reranker:
        overrides["reranker"] = {"path": str(args.reranker)}
    if args.embedder:
        overrides["embedder"] = {"path": str(args.embedder)}
    overrides.update(parse_overrides(args.sets))  # last: `--set` refines what --model/--reranker/--embedder gave
    settings = load_serve_settings(config, overrides)
    if args.no_reranker:
        settings = settings.model_copy(update={"reranker": None})
    if args.no_embedder:
        settings = settings.model_copy(update={"embedder": None})
    if args.personas:
        settings = with_personas(settings, args.personas)
    return settings


def with_personas(settings: Any, folder: Path) -> Any:
    """``settings`` serving the adapters of ``folder/adapters.json`` as personas (``--personas``)."""
    from edgellm.serve.personas import base_model_from_adapters, default_router, personas_from_adapters
    from edgellm.serve.settings import ServeSettings

    data = settings.model_dump(mode="json")
    base = base_model_from_adapters(folder)
    same = [m for m in data["models"] if Path(m["path"]).resolve() == Path(base["path"]).resolve()]
    if same:
        base["name"] = same[0]["name"]
    else:
        data["models"].append(base)
    data["personas"] = data["personas"] + personas_from_adapters(folder, base["name"])
    if not data["routers"]:
        data["routers"] = [default_router(data["personas"])]
    return ServeSettings.model_validate(data)


def _run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT, then drain (``serve/drain.py``): exit 0 once the requests in flight have finished
    or been ended after ``shutdown_timeout`` seconds; 3 if the server could not start (uvicorn's code)."""
    import uvicorn

    from edgellm.serve.app import create_app
    from edgellm.serve.drain import Drain, DrainingServer

    settings = settings_from_args(args)
    logging.getLogger().setLevel(settings.log_level.upper())
    names = ", ".join([m.name for m in settings.models] + ([f"{settings.models_dir}/*"] if settings.models_dir else []))
    print(f"edgellm serve: {names} on http://{settings.host}:{settings.port} (engine: {settings.engine})", flush=True)
    drain = Drain(settings.shutdown_timeout)
    config = uvicorn.Config(
        create_app(settings, drain=drain),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # after the drain: the last responses' time to go out before uvicorn cancels them
        timeout_graceful_shutdown=5,
    )
    server = DrainingServer(config, drain)
    server.run()
    return 0 if server.started else STARTUP_FAILURE
