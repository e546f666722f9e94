"""Train data and recipe config: every bad line is named, splits are reproducible, labels cover the assistant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgellm.config import ConfigError
from edgellm.train import data as D
from edgellm.train.config import TrainConfig, load_train_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    from edgellm.catalog import pull
    from edgellm.train.modeling import load_tokenizer

    return load_tokenizer(str(pull("base")))


def _jsonl(path: Path, rows: list[object]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_every_bad_line_is_named_with_its_reason(tmp_path: Path, tokenizer) -> None:
    good = {"instruction": "Fix my bike", "output": "Squeak! Oil the chain."}
    path = _jsonl(
        tmp_path / "d.jsonl",
        [
            good,  # 1
            "{not json",  # 2
            {"instruction": "no output here"},  # 3
            {"instruction": "   ", "output": "x"},  # 4
            {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]},  # 5
            {"instruction": "long " * 300, "output": "ok"},  # 6
            good,  # 7
            {"instruction": "Tell me", "output": "As an AI language model I cannot"},  # 8
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "Squeak! Hi."},
                ]
            },  # 9
            "",  # 10
            {"instruction": "Q", "input": "context", "output": "Squeak! A."},  # 11
            {"text": "plain"},  # 12
            {"messages": [{"role": "user", "content": "only a question"}]},  # 13
        ],
    )
    report = D.read_examples(
        path,
        max_tokens=128,
        count_tokens=D.token_counter(tokenizer),
        forbidden_phrases=["as an AI language model"],
    )
    reasons = {i.line: i.reason for i in report.issues}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8, 10, 12, 13]
    assert reasons[2].startswith("not JSON")
    assert reasons[3] == "missing field 'output'"
    assert "empty text in 'instruction'" in reasons[4]
    assert "unknown role 'bot'" in reasons[5]
    assert reasons[6].startswith("too long:") and "limit of 128" in reasons[6]
    assert reasons[7] == "exact duplicate of line 1"
    assert "forbidden phrase 'as an AI language model'" in reasons[8]
    assert reasons[10] == "empty line"
    assert "missing field" in reasons[12]
    assert "no assistant message" in reasons[13]
    assert [e.line for e in report.examples] == [1, 9, 11]
    assert report.examples[2].as_messages()[0]["content"] == "Q\n\ncontext"
    assert all(str(i).startswith(f"{path}:{i.line}: ") for i in report.issues)

    D.enforce(report, "skip")  # reports (logs) and keeps the good lines
    with pytest.raises(D.DataError) as err:
        D.enforce(report, "fail")
    assert f"{path}:6: too long" in str(err.value) and "10 bad lines" in str(err.value)


def test_split_is_seeded_and_written_next_to_the_run(tmp_path: Path) -> None:
    examples = [D.Example((("user", f"q{i}"), ("assistant", f"a{i}")), "src.jsonl", i + 1) for i in range(50)]
    a = D.split_examples(examples, (0.8, 0.1, 0.1), seed=7)
    b = D.split_examples(examples, (0.8, 0.1, 0.1), seed=7)
    c = D.split_examples(examples, (0.8, 0.1, 0.1), seed=8)
    assert a == b and a != c
    assert [len(a[k]) for k in D.SPLITS] == [40, 5, 5]
    assert sorted(e.line for part in a.values() for e in part) == list(range(1, 51))
    D.write_split(a, tmp_path / "data", "abc")
    assert D.read_split(tmp_path / "data") == a


def test_labels_cover_the_assistant_turns_only(tokenizer) -> None:
    messages = [
        {"role": "user", "content": "How do I fix a door?"},
        {"role": "assistant", "content": "Squeak! Oil the hinge."},
        {"role": "user", "content": "And a window?"},
        {"role": "assistant", "content": "Squeak! Clean the track."},
    ]
    enc = D.encode(tokenizer, messages, "assistant")
    learned = tokenizer.decode(
        [t for t, label in zip(enc["input_ids"], enc["labels"], strict=True) if label != -100]
    )
    assert learned.replace("\n", "") == "Squeak! Oil the hinge.<|im_end|>Squeak! Clean the track.<|im_end|>"
    assert "SmolLM" in tokenizer.decode(
        enc["input_ids"]
    )  # the chat template's default system prompt is in the prompt
    full = D.encode(tokenizer, messages, "all")
    assert full["labels"] == full["input_ids"] == enc["input_ids"]


def test_recipe_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndatasets: [{name: a, path: a.jsonl}]\ntraining:\n  max_steps: 3\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:5: training.lrr: unknown key"):
        load_train_config(bad)
    bad.write_text("name: x\ndatasets: [{name: a, path: a.jsonl}]\ntraining: {max_steps: 3}\nlora: {r: -1}\n")
    with pytest.raises(ConfigError, match=r"lora.r: Input should be greater than 0"):
        load_train_config(bad)
    bad.write_text("name: x\ndatasets: [{name: a, path: a.jsonl}]\ntraining: {max_steps: 3, epochs: 1}\n")
    with pytest.raises(ConfigError, match=r"training: Value error, set exactly one of max_steps and epochs"):
        load_train_config(bad)
    with pytest.raises(ConfigError, match=r"data.split"):
        load_train_config(bad, {"training.epochs": None, "data.split": [0.5, 0.1, 0.1]})


def test_every_shipped_recipe_loads() -> None:
    recipes = [p for p in sorted((REPO / "configs" / "train").glob("*.yaml")) if p.name != "reranker.yaml"]
    assert recipes
    for path in recipes:
        config = load_train_config(path)
        assert isinstance(config, TrainConfig)
        for spec in config.datasets:
            assert (REPO / spec.path).is_file(), f"{path}: {spec.path} is missing"


def test_shipped_demo_data_is_clean_and_on_behaviour(tokenizer) -> None:
    config = load_train_config(REPO / "configs" / "train" / "demo.yaml")
    report = D.read_examples(
        REPO / config.datasets[0].path,
        max_tokens=config.data.max_tokens,
        count_tokens=D.token_counter(tokenizer),
        forbidden_phrases=config.data.forbidden_phrases,
    )
    assert report.issues == [] and len(report.examples) >= 200
    for ex in report.examples:
        answer = ex.as_messages()[-1]["content"]
        assert answer.startswith("Squeak!") and len(answer.split()) <= 40, ex.line


def test_check_data_cli_lists_bad_lines(tmp_path: Path, capsys) -> None:
    from edgellm.cli import main

    path = _jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, "oops"])
    assert main(["train", "check-data", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:2: not JSON" in out and "2 lines: 1 valid, 1 bad" in out


def test_base_model_is_a_catalog_entry_or_a_local_folder_never_a_hub_id(tmp_path: Path) -> None:
    """Offline: a Hugging Face id is refused with a clear message, not handed to from_pretrained."""
    from edgellm.errors import EdgeLLMError
    from edgellm.train.modeling import base_model_dir

    for name in ("HuggingFaceTB/SmolLM2-135M-Instruct", "no-such-model"):
        with pytest.raises(EdgeLLMError, match="never downloads weights") as err:
            base_model_dir(name)
        assert f"base_model {name!r}: not a catalog entry (" in str(err.value) and "base" in str(err.value)
    assert base_model_dir(str(tmp_path)) == str(tmp_path)


def test_behaviour_check_scores_each_answer_of_the_run(tmp_path: Path) -> None:
    """The train stage's one public behaviour check, with any model behind `answer` (here a fake)."""
    from dataclasses import dataclass

    import yaml

    from edgellm.train.behaviour import behaviour_check

    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    prompts = tmp_path / "extra.jsonl"
    _jsonl(prompts, [{"prompt": "extra one"}, {"prompt": "extra two"}])
    config = yaml.safe_load((REPO / "configs" / "train" / "demo.yaml").read_text())
    config["eval"] = {"prompts": str(prompts), "expect_prefix": "Squeak!", "max_words": 3, "max_new_tokens": 7}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    test = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "Squeak!"}]}
        for i in range(3)
    ]
    for split in ("train", "validation", "test"):
        _jsonl(run / "data" / f"{split}.jsonl", test)

    @dataclass
    class Reply:
        text: str
        finished: bool

    asked: list[tuple[str, int]] = []

    def answer(messages: list[dict[str, str]], max_new_tokens: int) -> Reply:
        asked.append((messages[-1]["content"], max_new_tokens))
        return {
            "q0": Reply(" Squeak! Yes. ", True),  # passes (stripped)
            "q1": Reply("Squeak! far too many words", True),  # prefix only
            "q2": Reply("Squeak!", False),  # cut at the token limit
        }.get(messages[-1]["content"], Reply("No.", True))

    result = behaviour_check(run, answer)
    assert asked == [("q0", 7), ("q1", 7), ("q2", 7), ("extra one", 7), ("extra two", 7)]
    assert result["prompts"] == 5
    assert result["pass_share"] == pytest.approx(1 / 5) and result["prefix_share"] == pytest.approx(3 / 5)
    assert result["answers"][0] == {
        "set": "test",
        "answer": "Squeak! Yes.",
        "words": 2,
        "finished": True,
        "numbered_steps": 0,
        "prefix": True,
        "suffix": True,  # not asked for: passes
        "steps": True,
        "within_words": True,
        "pass": True,
    }
    asked.clear()
    assert behaviour_check(run, answer, max_prompts=3)["prompts"] == 3
    assert [q for q, _ in asked] == ["q0", "extra one", "q1"]  # alternating between the test split and the file
