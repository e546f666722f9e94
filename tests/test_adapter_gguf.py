"""LoRA adapters as GGUF, for real: a QLoRA run on the tiny random Llama, its adapter converted by llama.cpp's own
``convert_lora_to_gguf.py``, applied by llama.cpp at run time on a 16-bit and a quantized GGUF of the same base, and
compared with the Hugging Face base with the adapter merged in (KL per position). A wrong base, a corrupted adapter
and a failed gate are refused with the reason; the converter cache made before the LoRA script was kept is
refreshed by setup (from a local source distribution here: no network).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from edgellm.fsutil import sha256_file

REPO = Path(__file__).resolve().parents[1]
HAMMY = REPO / "train" / "data" / "hammy.jsonl"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide random Llama with SmolLM2's tokenizer and chat template, initialised with a large spread so
    that its next-token distributions are peaked (a near-uniform model hides any error in the KL)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from edgellm.catalog import pull

    tokenizer = AutoTokenizer.from_pretrained(pull("base"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("peaked-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    """A real 6-step QLoRA run on the tiny Llama (r=8, alpha=16, every linear layer), no merge."""
    from edgellm.train.qlora import train

    tmp = tmp_path_factory.mktemp("lora-run")
    data = tmp / "hammy-head.jsonl"
    data.write_text("\n".join(HAMMY.read_text(encoding="utf-8").splitlines()[:20]) + "\n", encoding="utf-8")
    recipe = {
        "name": "tiny",
        "base_model": str(tiny_llama),
        "output_dir": str(tmp / "runs"),
        "datasets": [{"name": "hammy", "path": str(data)}],
        "data": {"max_tokens": 160, "split": [0.6, 0.2, 0.2]},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"batch_size": 4, "lr": 1e-2, "max_steps": 6, "eval_every": 6, "save_every": 6},
        "merge": {"enabled": False},
    }
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    [run] = train(tmp / "recipe.yaml")
    return run


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> dict[str, Path]:
    """The tiny base as f16 (llama.cpp's converter) and q4_1 (llama.cpp's quantizer, like the served default)."""
    from edgellm.convert.llamacpp import quantize, run_converter, setup_converter

    converter = setup_converter()  # finds the converter `make setup` fetched
    tmp = tmp_path_factory.mktemp("tiny-ggufs")
    f16, q41 = tmp / "tiny-f16.gguf", tmp / "tiny-q4_1.gguf"
    run_converter(converter, tiny_llama, f16, "f16")
    quantize(f16, q41, "q4_1", 10**7)
    return {"f16": f16, "q4_1": q41}


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, tiny_run: Path, tiny_ggufs: dict[str, Path]):
    """The run converted for the quantized base: the gate's f16 base is converted from the run's base_model."""
    from edgellm.convert.adapter import convert_adapters

    out = tmp_path_factory.mktemp("adapters") / "tiny"
    return convert_adapters(tiny_run, tiny_ggufs["q4_1"], out, reference_gguf=tiny_ggufs["f16"], threads=1)


def test_adapter_converts_loads_and_matches_the_merged_model(converted, tiny_run, tiny_ggufs, tiny_llama):
    from edgellm.manifest import load_adapter_manifest

    m = converted
    [a] = m.adapters
    assert a.name == "hammy" and a.path == "hammy-lora-f16.gguf" and a.outtype == "f16"
    assert a.rank == 8 and a.alpha == 16.0 and a.scale == 1.0
    assert a.target_modules == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert a.n_tensors == 2 * 7 * 2  # 2 layers x 7 linear layers x (lora_a, lora_b)
    assert a.run == str(tiny_run.resolve()) and Path(a.source) == (tiny_run / "adapter").resolve()
    path = m.root / a.path
    assert a.size == path.stat().st_size and a.sha256 == sha256_file(path)
    # The base recorded is the served (quantized) file; the gate ran on an f16 conversion of the same model.
    assert m.base.file_name == "tiny-q4_1.gguf" and m.base.file_type == "Q4_1"
    assert m.base.sha256 == sha256_file(tiny_ggufs["q4_1"]) and m.base.absolute_path == tiny_ggufs["q4_1"].resolve()
    assert m.reference_base.file_type == "F16" and m.reference_base.absolute_path == tiny_ggufs["f16"].resolve()
    assert Path(m.base_hf) == tiny_llama.resolve()
    v = a.verification
    assert v.prompts == 4  # the run's test split: 20 examples x 0.2
    ref, served = v.reference, v.served
    assert ref.kl_threshold == 1e-3 and ref.tokenizer_matches_hf and ref.n_positions > 100
    assert ref.kl_mean < 1e-5 and ref.kl_p99 < 1e-4 and ref.top1_agreement > 0.99  # measured: 1.3e-7, 7.8e-7
    assert served is not None and served.kl_threshold is None
    assert served.kl_mean > ref.kl_mean  # 4-bit weights cost more than 16-bit rounding
    reloaded = load_adapter_manifest(m.root)
    assert reloaded == m
    reloaded.check_files()
    assert not list(m.root.glob(".*.tmp"))


def test_the_adapter_changes_llama_cpp_outputs_as_the_merge_does(converted, tiny_run, tiny_ggufs, tiny_llama):
    """Base + adapter is closer to the merged model than the base alone: the adapter is really applied."""
    from edgellm.convert.adapter import merged_reference
    from edgellm.convert.runner import GGUFRunner
    from edgellm.convert.verify import DEFAULT_PROMPTS, compare_to_reference
    from edgellm.manifest import Verification

    reference = merged_reference(tiny_llama, tiny_run / "adapter", DEFAULT_PROMPTS[:2])
    adapter = converted.root / converted.adapters[0].path
    results = {}
    for label, lora in (("base", []), ("base+adapter", [(adapter, 1.0)])):
        with GGUFRunner(tiny_ggufs["f16"], n_ctx=256, n_threads=1, lora=lora) as model:
            results[label] = Verification(loads=True)
            compare_to_reference(model, reference, results[label], label)
    assert results["base+adapter"].kl_mean * 20 < results["base"].kl_mean


def test_behaviour_check_runs_on_the_served_base_with_the_adapter(converted, tmp_path):
    from edgellm.convert.behaviour import adapter_behaviour_shares

    out = tmp_path / "behaviour.json"
    shares = adapter_behaviour_shares(converted.root, out, max_prompts=2, n_threads=1)
    assert list(shares) == ["hammy"] and shares["hammy"]["prompts"] == 2
    assert shares["hammy"]["base"] == "tiny-q4_1.gguf" and shares["hammy"]["adapter"] == "hammy-lora-f16.gguf"
    assert json.loads(out.read_text()) == shares


def test_train_eval_reports_loss_perplexity_rouge_and_bleu(tiny_run):
    """`edgellm train eval` on the real tiny run (base model only: the run has no merge): the reference metrics are
    computed on its greedy answers to the test split against the test split's answers."""
    import math

    from edgellm.train.evaluate import evaluate_folder

    result = evaluate_folder(tiny_run, ("base",))
    base = result["models"]["base"]
    assert base["reference_answers"] == result["test_examples"] == 4
    assert base["test_perplexity"] == pytest.approx(math.exp(base["test_loss"]))
    assert 0.0 <= base["rouge_l"] <= 1.0 and 0.0 <= base["bleu"] <= 100.0
    assert "pass_share" not in base  # the tiny run asks for no behaviour
    assert json.loads((tiny_run / "eval.json").read_text())["models"]["base"]["bleu"] == base["bleu"]


def test_rerun_skips_an_unchanged_adapter(converted, tiny_run, tiny_ggufs, monkeypatch):
    from edgellm.convert import adapter as A

    def not_again(*args, **kwargs):
        raise AssertionError("an unchanged adapter was converted again")

    monkeypatch.setattr(A, "run_lora_converter", not_again)
    monkeypatch.setattr(A, "merged_reference", not_again)
    again = A.convert_adapters(tiny_run, tiny_ggufs["q4_1"], converted.root, reference_gguf=tiny_ggufs["f16"])
    assert again.adapters == converted.adapters


def test_a_failed_gate_refuses_the_adapter_and_keeps_no_file(tiny_run, tiny_ggufs, tmp_path, capsys):
    """Through the CLI: the measured figure in the one error line, exit 2, no adapter file and no manifest."""
    from edgellm.cli import main

    out = tmp_path / "out"
    args = ["convert", "--lora", str(tiny_run / "adapter"), "--base-gguf", str(tiny_ggufs["f16"]), "--out", str(out)]
    assert main([*args, "--max-kl", "1e-9", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"does not reproduce the merged model: mean KL divergence \d.*threshold 1e-09", err), err
    assert list(out.iterdir()) == []
    assert main(["convert", "--lora", str(tiny_run), "--out", str(out)]) == 2
    assert "--lora needs --base-gguf" in capsys.readouterr().err


def test_a_corrupted_adapter_tensor_fails_the_kl_check(converted, tiny_run, tiny_ggufs, tmp_path, tiny_llama):
    """One lora_b negated and scaled (a wrong layout or scale in a converter): the KL gate says so, with the figure."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from edgellm.convert.adapter import (
        MAX_ADAPTER_KL,
        AdapterVerificationError,
        held_out_texts,
        merged_reference,
        verify_adapter,
    )

    bad = tmp_path / "bad.gguf"
    shutil.copy(converted.root / converted.adapters[0].path, bad)
    reader = GGUFReader(bad, "r+")
    (tensor,) = [t for t in reader.tensors if t.name == "blk.1.ffn_down.weight.lora_b"]
    rows = tensor.data.reshape(tensor.data.shape[0], -1)
    rows[:] = -rows * 40  # flipped and scaled: the layer's update points the other way
    reader.data.flush()
    prompts = held_out_texts(tiny_run, AutoTokenizer.from_pretrained(tiny_llama), 4)
    reference = merged_reference(tiny_llama, tiny_run / "adapter", prompts)
    with pytest.raises(AdapterVerificationError, match=r"bad.gguf does not reproduce the merged model: mean KL"):
        verify_adapter(bad, tiny_ggufs["f16"], reference, MAX_ADAPTER_KL, n_threads=1)


def test_an_adapter_for_another_base_is_refused(converted, tiny_run, default_gguf, tmp_path):
    """The tiny adapter on SmolLM2's GGUF: refused before converting, and a converted file by its tensor shapes."""
    from edgellm.convert.adapter import AdapterError, check_fits, convert_adapters

    with pytest.raises(AdapterError, match=r"SmolLM2-135M-Instruct.Q4_1.gguf is not a GGUF of the adapters' base"):
        convert_adapters(tiny_run, default_gguf, tmp_path / "out", threads=1)
    assert not list((tmp_path / "out").glob("*.gguf"))
    adapter = converted.root / converted.adapters[0].path
    with pytest.raises(AdapterError, match=r"does not fit SmolLM2-135M-Instruct.Q4_1.gguf: blk.0.*another base"):
        check_fits(adapter, default_gguf, tiny_run / "adapter")


def test_llama_cpp_refuses_a_mismatched_adapter_file(converted, default_gguf):
    from edgellm.convert.llamacpp import ConvertError
    from edgellm.convert.runner import GGUFRunner

    adapter = converted.root / converted.adapters[0].path
    with pytest.raises(ConvertError, match=r"cannot apply the LoRA adapter hammy-lora-f16.gguf to SmolLM2"):
        GGUFRunner(default_gguf, n_ctx=64, n_threads=1, lora=[(adapter, 1.0)])


def _adapter_copy(tiny_run: Path, tmp: Path) -> Path:
    folder = tmp / "adapter"
    shutil.copytree(tiny_run / "adapter", folder)
    return folder


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("invalid-json", r"adapter_config.json:1: invalid JSON"),
        ("no-weights", r"no adapter_model.safetensors"),
        ("truncated", r"adapter_model.safetensors: truncated or padded"),
        ("dora", r"use_dora is set; llama.cpp's GGUF LoRA cannot express DoRA"),
        ("rslora", r"use_rslora is set"),
        ("no-base", r"no train run around it names its base model; give the base's Hugging Face folder with --base"),
    ],
)
def test_bad_adapter_folders_are_refused_naming_the_file(tiny_run, tiny_ggufs, tmp_path, breakage, message):
    from edgellm.convert.adapter import AdapterError, convert_adapters

    folder = _adapter_copy(tiny_run, tmp_path)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if breakage == "invalid-json":
        config_path.write_text("{oops")
    elif breakage == "no-weights":
        (folder / "adapter_model.safetensors").unlink()
    elif breakage == "truncated":
        weights = folder / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    elif breakage in ("dora", "rslora"):
        config[f"use_{breakage}"] = True
        config_path.write_text(json.dumps(config))
    else:  # outside a run, and its base named by a hub id: never looked up
        config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
        config_path.write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=message):
        convert_adapters(folder, tiny_ggufs["f16"], tmp_path / "out", threads=1)
    assert not list((tmp_path / "out").glob("*.gguf")) if (tmp_path / "out").exists() else True


# --- the converter cache -------------------------------------------------------------------------------------------


def _fake_sdist(path: Path, with_lora: bool) -> Path:
    files = {
        "convert_hf_to_gguf.py": "print('hf')\n",
        "conversion/__init__.py": "TEXT_MODEL_MAP = {}\n",
        "gguf-py/gguf/__init__.py": "\n",
        "gguf-py/pyproject.toml": 'version = "0.0.1"\n',
        "LICENSE": "MIT\n",
        "README.md": "not kept\n",
    }
    if with_lora:
        files["convert_lora_to_gguf.py"] = "print('lora')\n"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"llama_cpp_python-9.9.9/vendor/llama.cpp/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_setup_refreshes_a_cache_made_before_the_lora_script_was_kept(tmp_path, monkeypatch):
    from edgellm.convert import llamacpp as L

    monkeypatch.setenv("EDGELLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(L, "binding_version", lambda: "9.9.9")
    # An old cache: marker and converter, no convert_lora_to_gguf.py (what `edgellm convert setup` used to keep).
    old = L.converter_dir("9.9.9")
    for name in ("convert_hf_to_gguf.py", "conversion/__init__.py", "gguf-py/gguf/__init__.py"):
        (old / name).parent.mkdir(parents=True, exist_ok=True)
        (old / name).write_text("old\n")
    (old / "edgellm-converter.json").write_text(json.dumps({"version": "9.9.9", "sdist_sha256": "old"}))
    assert L.find_converter() is None
    with pytest.raises(L.ConvertError, match=r"lacks convert_lora_to_gguf.py .*refresh it with `edgellm convert setup`"):
        L.require_converter()  # never downloads by itself

    with pytest.raises(L.ConvertError, match=r"has no vendor/llama.cpp/convert_lora_to_gguf.py"):
        L.setup_converter(sdist=_fake_sdist(tmp_path / "old.tar.gz", with_lora=False))
    assert (old / "convert_hf_to_gguf.py").read_text() == "old\n"  # a failed refresh leaves the cache as it was

    sdist = _fake_sdist(tmp_path / "llama_cpp_python-9.9.9.tar.gz", with_lora=True)
    converter = L.setup_converter(sdist=sdist)
    assert converter.lora_script.read_text() == "print('lora')\n"
    assert converter.script.read_text() == "print('hf')\n" and converter.sdist_sha256 == sha256_file(sdist)
    assert not (converter.root / "README.md").exists()
    assert L.require_converter() == converter
    assert L.setup_converter() == converter  # complete: kept as is


def test_the_fetched_converter_has_the_lora_script():
    from edgellm.convert.llamacpp import require_converter

    converter = require_converter()
    assert "LoraModel" in converter.lora_script.read_text(encoding="utf-8")


def test_adapter_manifest_errors(tmp_path):
    from edgellm.manifest import ManifestError, load_adapter_manifest

    with pytest.raises(ManifestError, match="no adapter manifest here"):
        load_adapter_manifest(tmp_path)
    (tmp_path / "adapters.json").write_text('{"base": 1}')
    with pytest.raises(ManifestError, match=r"adapters.json: created_at: Field required"):
        load_adapter_manifest(tmp_path)


def test_kl_p99_is_recorded_by_the_round_trip_comparison():
    from edgellm.convert.verify import HFReference, compare_to_reference
    from edgellm.manifest import Verification

    class Fake:  # a GGUF side whose distribution differs from the reference at one position in a hundred
        def tokenize(self, text, add_bos=True, special=True):
            return list(range(100))

        def logits(self, ids):
            out = np.zeros((100, 4), dtype=np.float32)
            out[7] = [9, 0, 0, 0]
            return out

    lp = np.log(np.full((100, 4), 0.25))
    ref = HFReference(prompts=("x",), token_ids=(tuple(range(100)),), logprobs=(lp,))
    result = Verification(loads=True)
    compare_to_reference(Fake(), ref, result, "fake")  # type: ignore[arg-type]
    assert result.kl_mean == pytest.approx(result.kl_max / 100)
    assert 0 < result.kl_p99 < result.kl_max
