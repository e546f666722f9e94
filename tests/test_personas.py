"""Personas (serve/personas.py) and routing (edgellm/routing.py): a request for a persona becomes a request for its
base with its adapters, prompt, caps and filters; the router picks a persona and explains why; profiles travel from
the train recipe through convert's adapter manifest to serve. Unit level: fake files and a fake embedder (the real
embedder runs in tests/test_bench_routing.py)."""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgellm.errors import ConfigError
from edgellm.manifest import LoraAdapter, PersonaProfile, load_adapter_manifest
from edgellm.routing import RouteProfile, Router, RoutingError, stem, words
from edgellm.serve.engine.base import ChatMessage, GenerationRequest, SamplingParams, UnknownModelError
from edgellm.serve.personas import (
    Persona,
    PersonaSet,
    build_router,
    default_router,
    personas_from_adapters,
    routing_text,
    with_system_prompt,
)
from edgellm.serve.settings import PersonaSettings, RouterSettings, ServeSettings
from edgellm.train.config import load_train_config

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "train" / "personas.yaml"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("base.gguf", "other.gguf", "a.gguf", "b.gguf", "c.gguf"):
        out[name] = tmp_path / name
        out[name].write_bytes(b"x")
    return out


@pytest.fixture
def settings(files: dict[str, Path]) -> ServeSettings:
    return ServeSettings.model_validate(
        {
            "models": [{"name": "base", "path": str(files["base.gguf"])}, {"name": "other", "path": str(files["other.gguf"])}],
            "personas": [
                {
                    "name": "hammy",
                    "base": "base",
                    "adapters": [{"path": str(files["a.gguf"])}],
                    "system_prompt": "You are Hammy.",
                    "max_tokens": 55,
                    "max_words": 40,
                    "forbidden_phrases": ["As an AI"],
                    "triggers": ["code", "bug", "step by step"],
                    "description": "a hamster coach",
                },
                {
                    "name": "pip",
                    "base": "base",
                    "adapters": [{"path": str(files["b.gguf"]), "scale": 0.5}, {"path": str(files["a.gguf"])}],
                    "triggers": ["fix", "repair"],
                },
                {"name": "olive", "base": "other", "adapters": [{"path": str(files["c.gguf"])}], "triggers": ["sad"]},
                {"name": "plain", "base": "base"},
            ],
            "routers": [{"name": "auto", "default": "hammy", "personas": ["hammy", "pip", "plain"]}],
        }
    )


def chat(*messages: tuple[str, str], **params: Any) -> GenerationRequest:
    return GenerationRequest(
        model="hammy", messages=tuple(ChatMessage(r, c) for r, c in messages), params=SamplingParams(**params)
    )


# ---------------------------------------------------------------------------------------------------------------------
# PersonaSet: adapters per base, and a request made for the base


def test_loras_are_the_distinct_files_per_base_in_configuration_order(settings, files):
    personas = PersonaSet.from_settings(settings)
    assert personas.bases() == ["base", "other"]
    assert personas.loras_for("base") == (files["a.gguf"].resolve(), files["b.gguf"].resolve())
    assert personas.loras_for("other") == (files["c.gguf"].resolve(),)
    assert personas.loras_for("nobody") == ()
    assert personas.lora_of("pip") == ((1, 0.5), (0, 1.0))
    assert personas.lora_of("plain") == ()


def test_apply_makes_a_request_for_the_base_with_the_personas_profile(settings, files):
    request = chat(("user", "My code has a bug"), max_tokens=200, stop=("\n\n",))
    applied = PersonaSet.from_settings(settings).apply("hammy", request)
    assert applied.model == "base"
    assert applied.lora == ((0, 1.0),)
    assert applied.messages == (ChatMessage("system", "You are Hammy."), ChatMessage("user", "My code has a bug"))
    assert applied.params.max_tokens == 55 and applied.params.stop == ("\n\n",)
    assert applied.params.max_words == 40 and applied.params.forbidden_phrases == ("As an AI",)


def test_the_persona_prompt_goes_before_the_clients_system_message(settings):
    personas = PersonaSet.from_settings(settings)
    applied = personas.apply("hammy", chat(("system", "Answer in French."), ("user", "Salut"), max_tokens=20))
    assert applied.messages is not None
    assert applied.messages[0] == ChatMessage("system", "You are Hammy.\n\nAnswer in French.")
    assert applied.params.max_tokens == 20  # the smaller of the two
    assert with_system_prompt((ChatMessage("developer", "Be brief."),), "P")[0] == ChatMessage("developer", "P\n\nBe brief.")


def test_a_raw_prompt_is_left_as_it_is_and_still_gets_adapters_and_caps(settings):
    request = GenerationRequest(model="pip", prompt="Once upon a time", params=SamplingParams(max_tokens=9))
    applied = PersonaSet.from_settings(settings).apply("pip", request)
    assert applied.prompt == "Once upon a time" and applied.messages is None
    assert applied.lora == ((1, 0.5), (0, 1.0)) and applied.params.max_tokens == 9


def test_structured_output_gets_no_text_filters(settings):
    request = GenerationRequest(model="hammy", messages=(ChatMessage("user", "x"),), json_schema={"type": "object"})
    applied = PersonaSet.from_settings(settings).apply("hammy", request)
    assert applied.params.max_words is None and applied.params.forbidden_phrases == ()
    assert applied.params.max_tokens == 55


def test_unknown_persona_is_an_unknown_model(settings):
    with pytest.raises(UnknownModelError, match="no persona 'nope'; personas: hammy, pip, olive, plain"):
        PersonaSet.from_settings(settings).apply("nope", chat(("user", "hi")))


def test_an_adapter_listed_twice_is_refused(files):
    with pytest.raises(ValueError, match="listed twice"):
        PersonaSettings.model_validate(
            {"name": "x", "base": "b", "adapters": [{"path": str(files["a.gguf"])}, {"path": str(files["a.gguf"])}]}
        )


def test_routing_text_is_the_last_user_message_or_the_prompt():
    request = chat(("system", "s"), ("user", "first"), ("assistant", "a"), ("user", "last"), ("assistant", "b"))
    assert routing_text(request) == "last"
    assert routing_text(GenerationRequest(model="m", prompt="raw")) == "raw"


def test_profile_fields_are_one_contract_from_train_to_serve():
    """The profile a train recipe writes and adapters.json carries is what a serve persona takes."""
    assert set(PersonaProfile.model_fields) <= set(PersonaSettings.model_fields)


# ---------------------------------------------------------------------------------------------------------------------
# Routing: keywords


def keyword_router(**kwargs: Any) -> Router:
    profiles = [
        RouteProfile("hammy", ("code", "bug", "what is")),
        RouteProfile("pip", ("fix", "step by step", "tyre")),
        RouteProfile("olive", ("sad", "i feel", "worry")),
    ]
    return Router("auto", profiles, default="hammy", **kwargs)


def test_normalization_for_trigger_matching():
    assert words("Don't FIX my Bugs, boxes & worries!") == ("dont", "fix", "my", "bug", "box", "worry")
    assert [stem(w) for w in ("stress", "anxious", "this", "tyres", "classes", "gas")] == [
        "stress", "anxious", "this", "tyre", "class", "gas"
    ]


def test_keyword_scores_count_matched_trigger_words():
    decision = keyword_router().route("I feel sad: can you FIX it step-by-step? Two tyres, bugs...")
    assert decision.scores == {"hammy": 1.0, "pip": 5.0, "olive": 3.0}  # bug; fix + step by step + tyre; i feel + sad
    assert decision.persona == "pip" and not decision.fallback
    assert decision.matched["pip"] == ("fix", "step by step", "tyre")
    assert "pip scored 5" in decision.reason and "'step by step'" in decision.reason


def test_triggers_match_whole_words_only():
    decision = keyword_router().route("Debugging the barcode prefix; whatis; sadly")
    assert decision.scores == {"hammy": 0.0, "pip": 0.0, "olive": 0.0}
    assert decision.fallback and decision.persona == "hammy"
    assert "no persona reached the threshold 1" in decision.reason


def test_a_tie_goes_to_the_default_when_it_is_among_the_best():
    assert keyword_router().route("sad code").persona == "hammy"
    tie = keyword_router().route("sad tyre")
    assert tie.persona == "pip" and "the first in order wins" in tie.reason


def test_threshold_and_header_and_dict():
    decision = keyword_router(threshold=2).route("fix it")
    assert decision.fallback and decision.persona == "hammy" and decision.threshold == 2
    assert decision.header_value() == "persona=hammy; method=keywords; scores=hammy:0.0,pip:1.0,olive:0.0; fallback=true"
    assert keyword_router().route("what is a worry").header_value() == (
        "persona=hammy; method=keywords; scores=hammy:2.0,pip:0.0,olive:1.0"
    )
    body = keyword_router().route("i feel sad").as_dict()
    assert body["persona"] == "olive" and body["matched"] == {"olive": ["sad", "i feel"]}
    json.dumps(body)


def test_router_configuration_errors_say_what_to_fix():
    with pytest.raises(RoutingError, match="default 'nobody' is not among its personas"):
        Router("auto", [RouteProfile("a")], default="nobody")
    with pytest.raises(RoutingError, match="needs an embedder"):
        Router("auto", [RouteProfile("a")], default="a", method="embeddings")
    with pytest.raises(RoutingError, match="no letters or digits"):
        Router("auto", [RouteProfile("a", ("?!",))], default="a")


# ---------------------------------------------------------------------------------------------------------------------
# Routing: embeddings and hybrid, with a fake embedder (bag of words over a tiny vocabulary)


@dataclass
class _Out:
    vectors: Any


class FakeEmbedder:
    VOCAB = ("hamster", "code", "repair", "steps", "feelings", "sad")

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def embed(self, inputs: Sequence[str]) -> _Out:
        self.calls.append(list(inputs))
        rows = np.array([[t.lower().count(w) for w in self.VOCAB] for t in inputs], dtype=np.float32) + 0.01
        return _Out(rows / np.linalg.norm(rows, axis=1, keepdims=True))


PROFILES = [
    RouteProfile("hammy", ("code",), "a hamster coach for code"),
    RouteProfile("pip", ("fix",), "repair steps"),
    RouteProfile("olive", ("sad",), "feelings"),
]


def test_embeddings_pick_the_closest_description_and_embed_personas_once():
    fake = FakeEmbedder()
    router = Router("auto", PROFILES, default="hammy", method="embeddings", embedder=fake)
    assert router.blocking
    decision = router.route("my feelings today")
    assert decision.persona == "olive" and decision.method == "embeddings" and decision.threshold == 0.15
    assert decision.scores["olive"] > 0.5 > decision.scores["pip"]
    router.route("repair steps please")
    assert fake.calls[0] == ["a hamster coach for code. code", "repair steps. fix", "feelings. sad"]
    assert len(fake.calls) == 3  # the persona texts once, then one per message
    strict = Router("auto", PROFILES, default="hammy", threshold=0.9, method="embeddings", embedder=fake)
    assert strict.route("zzz").fallback and strict.route("zzz").persona == "hammy"


def test_hybrid_adds_keywords_to_similarity_in_threshold_units():
    router = Router("auto", PROFILES, default="hammy", method="hybrid", embedder=FakeEmbedder())
    keyword = router.keyword_matches("fix my feelings")
    similarity = router.similarities("fix my feelings")
    decision = router.route("fix my feelings")
    assert keyword["pip"] == ("fix",)
    assert decision.scores["pip"] == pytest.approx(1 + similarity["pip"] / 0.15)
    assert decision.scores["olive"] == pytest.approx(similarity["olive"] / 0.15)


def test_build_router_from_settings(settings):
    personas = PersonaSet.from_settings(settings)
    router = build_router(settings.routers[0], personas)
    assert [p.name for p in router.profiles] == ["hammy", "pip", "plain"] and router.threshold == 1.0
    assert router.route("please repair this").persona == "pip"
    everyone = build_router(RouterSettings(name="r", default="olive", threshold=0.5), personas)
    assert [p.name for p in everyone.profiles] == ["hammy", "pip", "olive", "plain"] and everyone.threshold == 0.5


# ---------------------------------------------------------------------------------------------------------------------
# Profiles from training to serving: the recipe's persona block -> the run -> adapters.json -> serve


def test_the_recipe_gives_each_persona_a_profile():
    recipe = load_train_config(RECIPE)
    profiles = {d.name: d.persona for d in recipe.datasets}
    assert set(profiles) == {"hammy", "pip", "olive"}
    for name, profile in profiles.items():
        assert profile is not None and profile.system_prompt and profile.description and len(profile.triggers) >= 10
        assert name in profile.triggers
    assert profiles["hammy"].max_tokens == 55 and profiles["hammy"].max_words == 40


def test_a_typo_in_a_persona_block_is_named(tmp_path):
    recipe = RECIPE.read_text(encoding="utf-8").replace("      max_tokens: 55\n", "      max_tokenz: 55\n")
    (tmp_path / "r.yaml").write_text(recipe, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"datasets\.0\.persona\.max_tokenz"):
        load_train_config(tmp_path / "r.yaml")


def _fake_adapter_run(tmp_path: Path) -> Path:
    """A run folder as `train` leaves it for one dataset of the personas recipe: config.yaml + a LoRA adapter."""
    from edgellm.train.qlora import prepare_folder

    recipe = load_train_config(RECIPE, {"output_dir": str(tmp_path / "runs")})
    spec = recipe.datasets[1]  # pip
    folder = recipe.adapter_dirs()[spec.name]
    prepare_folder(folder, recipe, spec)
    adapter = folder / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    header = json.dumps(
        {"m.lora_A.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
         "m.lora_B.weight": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    ).encode()
    (adapter / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    return adapter


def test_convert_carries_the_runs_persona_block(tmp_path):
    from edgellm.convert.adapter import read_adapter

    source = read_adapter(_fake_adapter_run(tmp_path))
    assert source.name == "pip" and source.persona is not None
    assert source.persona == PersonaProfile.model_validate(load_train_config(RECIPE).datasets[1].persona.model_dump())


def write_adapters_json(folder: Path, personas: dict[str, dict[str, Any] | None]) -> Path:
    """An adapters.json (and its files) as `edgellm convert --lora` writes it, for one fake base."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base-q4_1.gguf").write_bytes(b"base")
    base = {"path": "base-q4_1.gguf", "file_name": "base-q4_1.gguf", "sha256": "0" * 64, "size": 4,
            "architecture": "llama", "file_type": "Q4_1"}
    adapters = []
    for name, persona in personas.items():
        (folder / f"{name}-lora-f16.gguf").write_bytes(b"lora")
        adapters.append(
            {"name": name, "path": f"{name}-lora-f16.gguf", "size": 4, "sha256": "1" * 64, "outtype": "f16", "rank": 8,
             "alpha": 16, "target_modules": ["q_proj"], "n_tensors": 2, "n_params": 10, "source": "x",
             "source_sha256": "2" * 64, "verification": {"prompts": 1, "reference": {"loads": True}},
             "persona": persona}
        )
    manifest = {"created_at": "2026-12-01T00:00:00+00:00", "base": base, "base_hf": "hf", "reference_base": base,
                "tools": {"llama_cpp_python": "0", "llama_cpp": "0", "gguf_py": "0", "converter_sdist_sha256": "0"},
                "adapters": adapters}
    (folder / "adapters.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder


def test_personas_from_an_adapters_folder_are_valid_serve_settings(tmp_path):
    recipe = {d.name: d.persona.model_dump() for d in load_train_config(RECIPE).datasets if d.persona}
    folder = write_adapters_json(tmp_path / "personas", {"hammy": recipe["hammy"], "bare": None})
    manifest = load_adapter_manifest(folder)
    assert isinstance(manifest.adapter("hammy").persona, PersonaProfile) and manifest.adapter("bare").persona is None
    entries = personas_from_adapters(folder)
    assert [e["name"] for e in entries] == ["hammy", "bare"]
    assert entries[0]["base"] == "base-q4_1" and entries[0]["max_words"] == 40
    assert entries[0]["adapters"] == [{"path": str((folder / "hammy-lora-f16.gguf").resolve()), "scale": 1.0}]
    settings = ServeSettings.model_validate(
        {"models": [{"name": "base-q4_1", "path": str(folder / "base-q4_1.gguf")}], "personas": entries,
         "routers": [default_router(entries)]}
    )
    personas = PersonaSet.from_settings(settings)
    assert personas.loras_for("base-q4_1") == tuple((folder / f"{n}-lora-f16.gguf").resolve() for n in ("hammy", "bare"))
    assert settings.routers[0].default == "hammy"
    assert Persona.from_settings(settings.personas[1]).system_prompt is None


def test_an_old_manifest_without_personas_still_loads():
    entry = {"name": "x", "path": "x.gguf", "size": 1, "sha256": "0", "outtype": "f16", "rank": 1, "alpha": 1,
             "target_modules": [], "n_tensors": 0, "n_params": 0, "source": "s", "source_sha256": "0",
             "verification": {"prompts": 0, "reference": {"loads": True}}}
    assert LoraAdapter.model_validate(entry).persona is None
