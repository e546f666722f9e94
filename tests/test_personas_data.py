"""The three demo personas (configs/train/personas.yaml): their data follows their own behaviour, the behaviour
checks say pass or fail on known answers, each adapter gets its own check, and `train eval`'s ROUGE-L and BLEU give
the known figures on known strings. Plus the recipe end to end (slow: `make test-slow`)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgellm.train import data as D
from edgellm.train.behaviour import check_answer, numbered_steps
from edgellm.train.config import EvalSettings, load_train_config

REPO = Path(__file__).resolve().parents[1]
PERSONAS = REPO / "configs" / "train" / "personas.yaml"
CLOSING = "Hoot hoot, you've got this!"


def _persona_checks() -> dict[str, EvalSettings]:
    config = load_train_config(PERSONAS)
    return {spec.name: config.eval_for(spec) for spec in config.datasets}


def test_personas_recipe_gives_each_adapter_its_own_behaviour_check():
    checks = _persona_checks()
    assert list(checks) == ["hammy", "pip", "olive"]
    assert checks["hammy"].expect_prefix == "Squeak!" and checks["hammy"].max_words == 40
    assert checks["pip"].numbered_steps == 3 and checks["pip"].expect_prefix is None
    assert checks["olive"].expect_suffix == CLOSING and checks["olive"].numbered_steps is None
    for name, settings in checks.items():
        assert settings.prompts == Path(f"train/data/{name}_heldout_prompts.jsonl")
        assert settings.max_new_tokens == 80 and settings.use_test_split  # from the shared `eval`


def test_a_run_folder_records_its_datasets_behaviour_check(tmp_path):
    """What `train eval` and `convert --check-behaviour` read: the resolved config.yaml of each adapter folder."""
    from edgellm.train.qlora import prepare_folder

    config = load_train_config(PERSONAS, {"output_dir": str(tmp_path)})
    for spec, folder in zip(config.datasets, config.adapter_dirs().values(), strict=True):
        prepare_folder(folder, config, spec)
    resolved = load_train_config(tmp_path / "personas" / "pip" / "config.yaml")
    assert [d.name for d in resolved.datasets] == ["pip"] and resolved.datasets[0].eval is None
    assert resolved.eval.numbered_steps == 3 and resolved.eval.max_new_tokens == 80
    assert load_train_config(tmp_path / "personas" / "olive" / "config.yaml").eval.expect_suffix == CLOSING


@pytest.mark.parametrize("name, low, high", [("hammy", 200, 250), ("pip", 150, 250), ("olive", 150, 250)])
def test_persona_data_is_valid_and_follows_its_own_behaviour(name, low, high):
    settings = _persona_checks()[name]
    report = D.read_examples(REPO / "train" / "data" / f"{name}.jsonl", fmt="auto", max_tokens=256)
    assert not report.issues and low <= len(report.examples) <= high
    prompts = []
    for ex in report.examples:
        messages = ex.as_messages()
        answer = messages[-1]["content"]
        result = check_answer(answer, True, settings)
        assert result["pass"], (name, answer, result)
        prompts.append(messages[-2]["content"])
    assert len(set(prompts)) == len(prompts)  # no duplicated prompt
    heldout = [json.loads(line)["prompt"] for line in settings.prompts.read_text(encoding="utf-8").splitlines()]
    assert len(heldout) == len(set(heldout)) == 40
    assert not {p.split("\n")[0] for p in prompts} & set(heldout)  # held out means not trained on


def test_data_readme_documents_the_new_datasets_and_their_licence():
    readme = (REPO / "train" / "data" / "README.md").read_text(encoding="utf-8")
    for name in ("pip.jsonl", "olive.jsonl", "pip_heldout_prompts.jsonl", "olive_heldout_prompts.jsonl"):
        assert name in readme
    assert readme.count("CC0") >= 2


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("1. Plug it in.\n2. Turn it on.\n3. Wait.", 3),
        ("1) Plug it in.\n\n2) Turn it on.\n3) Wait.\n", 3),  # blank lines and "1)" are fine
        ("1. Plug it in.\n2. Turn it on.", 2),
        ("1. Plug it in.\n3. Wait.", 0),  # not in order
        ("Sure! Here is how:\n1. Plug it in.\n2. Turn it on.\n3. Wait.", 0),  # a preamble is not a step
        ("1. Plug it in.\n2. Turn it on.\n3. Wait.\nGood luck!", 0),  # nor a closing remark
        ("1.5 litres of water is plenty.", 0),
        ("", 0),
    ],
)
def test_numbered_steps(answer, expected):
    assert numbered_steps(answer) == expected


def test_pip_check_passes_exactly_three_steps_within_the_word_limit():
    pip = _persona_checks()["pip"]
    assert check_answer("1. Rinse it.\n2. Dry it.\n3. Oil it.", True, pip)["pass"]
    four = check_answer("1. Rinse it.\n2. Dry it.\n3. Oil it.\n4. Store it.", True, pip)
    assert not four["pass"] and not four["steps"] and four["numbered_steps"] == 4
    assert not check_answer("1. Rinse it.\n2. Dry it.\n3. Oil it.", False, pip)["pass"]  # cut at the token limit
    long = "1. " + "word " * 50 + "\n2. Dry it.\n3. Oil it."
    assert check_answer(long, True, pip) | {"steps": True} == check_answer(long, True, pip)
    assert not check_answer(long, True, pip)["within_words"]


def test_olive_check_passes_answers_ending_with_the_closing_line():
    olive = _persona_checks()["olive"]
    good = check_answer(f"Take one small step today.\n{CLOSING}", True, olive)
    assert good["pass"] and good["suffix"]
    assert check_answer(f"Take one small step today. {CLOSING}\n", True, olive)["pass"]  # trailing space is fine
    assert not check_answer(f"{CLOSING} Take one small step today.", True, olive)["pass"]
    assert not check_answer("Take one small step today. Hoot hoot!", True, olive)["suffix"]
    assert not check_answer("Squeak! Take one small step today.", True, olive)["pass"]


def test_reference_scores_on_known_strings():
    from edgellm.train.evaluate import reference_scores

    same = reference_scores(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same["rouge_l"] == pytest.approx(1.0) and same["bleu"] == pytest.approx(100.0)
    assert same["reference_answers"] == 1
    # ROUGE-L: longest common subsequence "the cat on the mat" (5 of 6 words each side): F1 = 5/6.
    partial = reference_scores(["the cat was on the mat"], ["the cat sat on the mat"])
    assert partial["rouge_l"] == pytest.approx(5 / 6)
    # BLEU: 1-4-gram precisions 5/6, 3/5, 1/4, 0/3 -> 0 without smoothing; sacrebleu's default 'exp' smoothing
    # gives the geometric mean with the zero count replaced by 1/2 (of 3): exp(mean(log [5/6, 3/5, 1/4, 1/6])).
    import math

    expected = 100 * math.exp(sum(math.log(p) for p in (5 / 6, 3 / 5, 1 / 4, 1 / 6)) / 4)
    assert partial["bleu"] == pytest.approx(expected, rel=1e-6)
    unrelated = reference_scores(["completely different words here"], ["the cat sat on the mat"])
    assert unrelated["rouge_l"] == 0.0 and unrelated["bleu"] < 1.0
    # Stemming: "running" and "run" are one word to ROUGE-L.
    assert reference_scores(["he is running"], ["he is run"])["rouge_l"] == pytest.approx(1.0)


@pytest.mark.slow
def test_personas_recipe_teaches_three_behaviours(tmp_path: Path) -> None:
    """The recipe end to end through the CLI (about an hour on two busy cores): each merged persona passes its own
    behaviour check far more often than the base and its test loss drops; then the three adapters become GGUF LoRA
    files for the served Q4_1 base, pass the KL gate on an f16 conversion of it, and keep their behaviour on it."""
    from edgellm.catalog import pull

    pull("base")
    default = pull("default")
    edgellm = [sys.executable, "-m", "edgellm"]
    started = time.monotonic()
    subprocess.run(
        [*edgellm, "train", "--config", str(PERSONAS), "--set", f"output_dir={tmp_path}"], cwd=REPO, check=True
    )
    train_seconds = time.monotonic() - started
    run = tmp_path / "personas"
    subprocess.run([*edgellm, "train", "eval", str(run)], cwd=REPO, check=True)
    for name in ("hammy", "pip", "olive"):
        result = json.loads((run / name / "eval.json").read_text())
        base, tuned = result["models"]["base"], result["models"]["merged"]
        print(f"{name}: pass share {base['pass_share']:.2f} -> {tuned['pass_share']:.2f} ({train_seconds:.0f}s all)")
        assert base["pass_share"] <= 0.1
        assert tuned["pass_share"] >= 0.6
        assert tuned["test_loss"] < base["test_loss"]
        assert 0 <= tuned["rouge_l"] <= 1 and tuned["rouge_l"] > base["rouge_l"]
    out = tmp_path / "models"
    convert = ["convert", "--lora", str(run), "--base-gguf", str(default), "--out", str(out), "--behaviour"]
    subprocess.run([*edgellm, *convert], cwd=REPO, check=True)
    adapters = json.loads((out / "adapters.json").read_text())
    behaviour = json.loads((out / "behaviour.json").read_text())
    assert adapters["base"]["file_type"] == "Q4_1" and adapters["reference_base"]["file_type"] == "F16"
    for a in adapters["adapters"]:
        assert a["verification"]["reference"]["kl_mean"] < 1e-3
        print(f"{a['name']}: served pass share {behaviour[a['name']]['pass_share']:.2f}")
        assert behaviour[a["name"]]["pass_share"] >= 0.5
