"""Docker cannot run here; check what can be checked: the compose file parses and is wired to /health with
read-only models, and the image installs with the same `make install` steps the README gives."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_compose_file_parses_with_healthcheck_and_readonly_models() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    svc = compose["services"]["edgellm"]
    assert "/health" in " ".join(svc["healthcheck"]["test"])
    assert any(v.startswith("./models:") and v.endswith(":ro") for v in svc["volumes"])
    assert all(p.startswith("127.0.0.1:") for p in svc["ports"]), "publish on loopback by default"
    assert svc["build"]["context"] == "."


def test_dockerfile_is_multistage_nonroot_and_uses_make_install() -> None:
    text = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\w+)", text, flags=re.M)
    assert stages == ["build", "runtime"]
    assert re.search(r"^RUN make install ", text, flags=re.M)
    user = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert user and user[-1] not in ("root", "0")
    assert "HEALTHCHECK" in text and "/health" in text
    # every source folder the package needs is copied into the image
    for pkg in ("edgellm", "serve", "convert", "train", "bench", "configs"):
        assert f"COPY {pkg} " in text


def test_makefile_install_honours_venv_and_extras() -> None:
    text = (REPO / "Makefile").read_text()
    assert "VENV   ?=" in text and "EXTRAS ?=" in text
    assert "-e '.[$(EXTRAS)]'" in text
    assert ".ci/run" not in text
    assert (REPO / ".ci" / "run").read_text().strip().endswith("make test")


def test_the_torchless_image_serves_the_configured_retrieval_models() -> None:
    """The image installs EXTRAS=serve (no torch): the shipped config's reranker and embedder must be GGUFs run by
    llama.cpp, and the compose service must not switch them off."""
    from edgellm.serve.settings import load_serve_settings

    settings = load_serve_settings(REPO / "configs" / "serve.yaml", {}, environ={})
    assert settings.reranker is not None and settings.reranker.resolved_backend() == "llama.cpp"
    assert settings.embedder is not None and settings.embedder.resolved_backend() == "llama.cpp"
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    env = compose["services"]["edgellm"]["environment"]
    assert "EDGELLM_SERVE__RERANKER" not in env and "EDGELLM_SERVE__EMBEDDER" not in env
    assert re.search(r"EXTRAS:\s*serve\s*$", (REPO / "docker-compose.yml").read_text(), flags=re.M)


def test_compose_serves_the_models_folder_on_demand() -> None:
    """The edge-box service serves the mounted folder with --models-dir, with settings that validate."""
    from edgellm.serve.settings import load_serve_settings

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    svc = compose["services"]["edgellm"]
    command = svc["command"]
    assert command[:2] == ["edgellm", "serve"] and command[command.index("--models-dir") + 1] == "/app/models"
    assert "./models:/app/models:ro" in svc["volumes"]
    env = {k: str(v) for k, v in svc["environment"].items()}
    settings = load_serve_settings(REPO / "configs" / "serve.yaml", {"models_dir": str(REPO / "models")}, environ=env)
    assert settings.max_loaded_models == 2 and settings.keep_alive == 300
