"""Settings: YAML + env + CLI overrides, and errors that name the key and the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgellm.config import ConfigError
from edgellm.serve.settings import load_serve_settings

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "serve.yaml"
    p.write_text(text)
    return p


def test_shipped_serve_config_loads() -> None:
    s = load_serve_settings(REPO / "configs" / "serve.yaml", environ={})
    assert s.port == 8000
    assert s.models[0].path == Path("models/SmolLM2-135M-Instruct.Q4_1.gguf")


def test_wrong_type_names_key_and_line(tmp_path: Path) -> None:
    p = write(tmp_path, "host: 127.0.0.1\nport: eighty\nmodels:\n  - {name: a, path: a.gguf}\n")
    with pytest.raises(ConfigError) as e:
        load_serve_settings(p, environ={})
    msg = str(e.value)
    assert f"{p}:2: port:" in msg
    assert "integer" in msg and "'eighty'" in msg


def test_unknown_nested_key_names_key_and_line(tmp_path: Path) -> None:
    p = write(tmp_path, "models:\n  - name: a\n    path: a.gguf\n    n_ctxx: 100\n")
    with pytest.raises(ConfigError, match=r":4: models\.0\.n_ctxx: unknown key"):
        load_serve_settings(p, environ={})


def test_missing_models_is_reported(tmp_path: Path) -> None:
    p = write(tmp_path, "port: 8000\n")
    with pytest.raises(ConfigError, match=r"no models: list some under `models` or serve a folder"):
        load_serve_settings(p, environ={})


def test_invalid_yaml_gives_line(tmp_path: Path) -> None:
    p = write(tmp_path, "port: 8000\nmodels: [\n")
    with pytest.raises(ConfigError, match=r"serve.yaml:\d+: invalid YAML"):
        load_serve_settings(p, environ={})


def test_env_then_cli_overrides(tmp_path: Path) -> None:
    p = write(tmp_path, "port: 8000\nmodels:\n  - {name: a, path: a.gguf, n_ctx: 512}\n")
    env = {"EDGELLM_SERVE__PORT": "9001", "EDGELLM_SERVE__MODELS__0__N_CTX": "1024"}
    s = load_serve_settings(p, environ=env)
    assert (s.port, s.models[0].n_ctx) == (9001, 1024)
    s = load_serve_settings(p, {"port": 9002, "models.0.n_ctx": 2048}, environ=env)
    assert (s.port, s.models[0].n_ctx) == (9002, 2048)


def test_set_null_sets_null_while_an_option_not_given_changes_nothing(tmp_path: Path) -> None:
    from edgellm.config import NULL, parse_overrides

    assert parse_overrides(["models.0.n_ctx=null", "a=~", "b=", "c=0"]) == {
        "models.0.n_ctx": NULL, "a": NULL, "b": NULL, "c": 0,
    }  # fmt: skip
    p = write(tmp_path, "port: 8000\nmodels:\n  - {name: a, path: a.gguf, n_ctx: 512}\n")
    s = load_serve_settings(p, {"port": None, **parse_overrides(["models.0.n_ctx=null"])}, environ={})
    assert s.port == 8000 and s.models[0].n_ctx is None  # null: sized from the model and the machine
    with pytest.raises(ConfigError, match="port"):
        load_serve_settings(p, parse_overrides(["port=null"]), environ={})


def test_bad_env_override_names_key(tmp_path: Path) -> None:
    p = write(tmp_path, "models:\n  - {name: a, path: a.gguf}\n")
    with pytest.raises(ConfigError, match=r"max_body_bytes: Input should be greater than or equal to 1024"):
        load_serve_settings(p, environ={"EDGELLM_SERVE__MAX_BODY_BYTES": "5"})


def test_duplicate_model_names_rejected(tmp_path: Path) -> None:
    p = write(tmp_path, "models:\n  - {name: a, path: a.gguf}\n  - {name: a, path: b.gguf}\n")
    with pytest.raises(ConfigError, match="repeated: a"):
        load_serve_settings(p, environ={})


def test_cli_flags_are_generated_from_settings(tmp_path: Path) -> None:
    from edgellm.cli import build_parser
    from edgellm.serve.cli import settings_from_args

    p = write(tmp_path, "models:\n  - {name: a, path: a.gguf}\n")
    args = build_parser().parse_args(
        ["serve", "--config", str(p), "--port", "9100", "--engine", "batched", "--set", "models.0.n_ctx=256"]
    )
    s = settings_from_args(args)
    assert (s.port, s.engine, s.models[0].n_ctx) == (9100, "batched", 256)
    args = build_parser().parse_args(["serve", "--config", str(p), "--engine", "turbo"])
    with pytest.raises(ConfigError, match="engine: Input should be 'serial' or 'batched'"):
        settings_from_args(args)


def test_model_flag_replaces_configured_models(tmp_path: Path) -> None:
    from edgellm.cli import build_parser
    from edgellm.serve.cli import settings_from_args

    p = write(tmp_path, "models:\n  - {name: a, path: a.gguf}\n")
    args = build_parser().parse_args(["serve", "--config", str(p), "--model", "x/one.gguf", "--model", "two.gguf"])
    s = settings_from_args(args)
    assert [m.name for m in s.models] == ["one", "two"]
    assert s.models[0].path == Path("x/one.gguf")
