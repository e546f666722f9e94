"""`edgellm bench routing` (bench/routing.py) on the shipped labelled set (bench/data/routing.jsonl), with the
personas of configs/train/personas.yaml and the real packaged embedder GGUF for the embeddings and hybrid methods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgellm.bench.routing import bench_routing, default_embedder, load_routing_set, routing_setup
from edgellm.cli import main
from edgellm.errors import ConfigError
from tests.test_personas import write_adapters_json

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "train" / "personas.yaml"
DATA = REPO / "bench" / "data" / "routing.jsonl"


def test_the_shipped_set_is_labelled_with_the_demo_personas_and_licensed():
    rows = load_routing_set(DATA)
    assert 60 <= len(rows) <= 90
    assert {r.persona for r in rows} == {"hammy", "pip", "olive"}
    assert {r.kind for r in rows} == {"clear", "implicit", "generic", "ambiguous"}
    assert all(r.persona == "hammy" for r in rows if r.kind in ("generic", "ambiguous"))  # the default
    assert len({r.text for r in rows}) == len(rows)
    readme = (DATA.parent / "README.md").read_text(encoding="utf-8")
    assert "routing.jsonl" in readme and "CC0" in readme


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory):
    if not default_embedder().is_file():
        pytest.skip(f"no packaged embedder at {default_embedder()} (make setup)")
    return bench_routing(RECIPE, out=tmp_path_factory.mktemp("routing"))


def test_every_method_reports_accuracy_confusion_and_latency(result):
    assert [m.method for m in result.methods] == ["keywords", "embeddings", "hybrid"]
    assert result.default == "hammy" and result.personas == ["hammy", "pip", "olive"]
    for m in result.methods:
        assert 0.0 <= m.accuracy <= 1.0 and m.n == len(load_routing_set(DATA))
        assert sum(sum(row.values()) for row in m.confusion.values()) == m.n
        assert sum(m.confusion[p][p] for p in m.confusion) == m.correct == m.n - len(m.misrouted)
        assert 0 < m.latency_ms_p50 <= m.latency_ms_p95
        assert set(m.accuracy_by_kind) == {"ambiguous", "clear", "generic", "implicit"}
    # The triggers carry information: keywords beat always answering with the default persona.
    assert result.method("keywords").accuracy > result.baseline_accuracy
    saved = json.loads(Path(result.files["json"]).read_text())
    assert saved["methods"][0]["method"] == "keywords"
    assert "| keywords |" in Path(result.files["table"]).read_text()


def test_the_cli_prints_the_table(tmp_path, capsys):
    assert main(["bench", "routing", "--config", str(RECIPE), "--no-embedder", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| keywords |" in printed and "embeddings" not in printed.split("keywords: label")[0]
    assert (tmp_path / "routing.json").is_file()


def test_personas_from_an_adapters_folder_or_a_serve_yaml(tmp_path):
    recipe = {p.name: p for p in routing_setup(RECIPE).profiles}
    profile = {"triggers": list(recipe["olive"].triggers), "description": recipe["olive"].description}
    folder = write_adapters_json(tmp_path / "personas", {"hammy": {"triggers": ["code"]}, "olive": profile})
    setup = routing_setup(folder)
    assert [p.name for p in setup.profiles] == ["hammy", "olive"] and setup.default == "hammy"
    assert routing_setup(folder, default="olive").default == "olive"

    serve = tmp_path / "serve.yaml"
    serve.write_text(
        "models: [{name: base, path: base.gguf}]\n"
        "personas:\n  - {name: a, base: base, triggers: [x]}\n  - {name: b, base: base, triggers: [y]}\n"
        "  - {name: c, base: base}\n"
        "routers: [{name: auto, default: b, personas: [a, b], threshold: 2}]\n"
    )
    setup = routing_setup(serve)
    assert [p.name for p in setup.profiles] == ["a", "b"] and setup.default == "b" and setup.threshold == 2


def test_a_set_naming_unknown_personas_is_refused(tmp_path):
    data = tmp_path / "set.jsonl"
    data.write_text(json.dumps({"text": "hi", "persona": "owl"}) + "\n")
    with pytest.raises(ConfigError, match=r"names personas \['owl'\]"):
        bench_routing(RECIPE, data=data, use_embedder=False)
    data.write_text("{not json}\n")
    with pytest.raises(ConfigError, match="set.jsonl:1: expected a JSON object"):
        load_routing_set(data)
