"""`edgellm convert` on real models: a tiny random Llama built here (with the default model's real tokenizer) and,
when `edgellm models pull base` has run, the SmolLM2-135M base model. Real conversion, quantization and llama.cpp."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("torch")

from edgellm.convert.llamacpp import (  # noqa: E402
    ConvertError,
    DiskFullError,
    UnsupportedArchitectureError,
    quantize,
    setup_converter,
)
from edgellm.convert.recipe import convert_model  # noqa: E402
from edgellm.convert.verify import DEFAULT_PROMPTS, RoundTripError, hf_reference, verify_gguf  # noqa: E402
from edgellm.fsutil import sha256_file  # noqa: E402
from edgellm.manifest import ManifestError, load_manifest  # noqa: E402
from edgellm.paths import models_dir  # noqa: E402

QUANTS = ["f16", "q8_0", "q4_k_m"]
BASE_HF = models_dir() / "SmolLM2-135M-Instruct-hf"


def make_tiny_llama(dest: Path, gguf: Path) -> Path:
    """A 2-layer random Llama, 256 wide (so k-quants apply), with SmolLM2's real tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        initializer_range=0.1,  # peaked next-token distributions, so a corrupted tensor shows in the KL
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def gguf_tensor_types(path: Path) -> dict[str, int]:
    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name for t in GGUFReader(path, "r").tensors))


def corrupt_tensor(path: Path, name: str) -> None:
    """Swap the two halves of a tensor's rows in place, like a wrong rotary permutation in a converter."""
    from gguf import GGUFReader

    reader = GGUFReader(path, "r+")
    (tensor,) = [t for t in reader.tensors if t.name == name]
    rows = tensor.data.reshape(tensor.data.shape[0], -1)
    half = rows.shape[0] // 2
    swapped = np.concatenate([rows[half:], rows[:half]]).copy()
    rows[:] = swapped
    reader.data.flush()


@pytest.fixture(scope="module")
def converter():
    return setup_converter()  # `edgellm convert setup` (`make setup` runs it): finds the fetched converter


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, default_gguf) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", default_gguf)


@pytest.fixture(scope="module")
def tiny_converted(tmp_path_factory, tiny_llama, converter):
    out = tmp_path_factory.mktemp("out") / "tiny"
    return convert_model(tiny_llama, out, quants=QUANTS)


def check_manifest(manifest, out: Path) -> None:
    assert [f.quant for f in manifest.files] == QUANTS
    for f in (manifest.reference, *manifest.files):
        path = out / f.path
        assert f.absolute_path == path.resolve()
        assert f.size == path.stat().st_size
        assert f.sha256 == sha256_file(path)
        if f.quant == "q4_k_m":  # cross-check the fast header reader against gguf-py's (slow) reader once
            assert f.tensor_types == gguf_tensor_types(path)
        assert f.has_chat_template and f.architecture == "llama"
        assert f.verification is not None and f.verification.loads
        assert f.verification.tokenizer_matches_hf is True
        assert f.verification.greedy_text.strip()
    assert manifest.reference.quant == "f16" and manifest.files[0] == manifest.reference
    reloaded = load_manifest(out / "manifest.json")
    assert reloaded == manifest
    reloaded.check_files()
    assert [reloaded.model_id(f) for f in reloaded.files] == [f"{out.name}:{q}" for q in QUANTS]


def test_tiny_llama_converts_quantizes_and_verifies(tiny_converted, tiny_llama):
    m = tiny_converted
    out = m.root
    check_manifest(m, out)
    assert m.source.sha256 and m.source.architecture == "LlamaForCausalLM"
    assert m.tools.llama_cpp_python == "0.3.36" and m.tools.gguf_py
    f16, q8, q4 = (m.variant(q) for q in QUANTS)
    # 2 layers x 9 tensors + token_embd + output_norm (tied output); 1-D norms stay F32.
    assert f16.tensor_types == {"F16": 15, "F32": 5}
    assert q8.tensor_types == {"Q8_0": 15, "F32": 5}
    assert set(q4.tensor_types) <= {"Q4_K", "Q6_K", "F32"} and q4.tensor_types["Q4_K"] > 0
    assert q4.fallbacks == {}  # 256/512-wide rows: no k-quant fallback
    # bits per weight = tensor bytes * 8 / parameters; the tied embedding is 90% of this model and q4_k_m keeps it Q6_K.
    assert 16 < f16.bits_per_weight < 16.1 and 8.4 < q8.bits_per_weight < 8.6 and 4.5 < q4.bits_per_weight < 7
    assert f16.size > q8.size > q4.size
    assert f16.verification.kl_mean < 1e-3 and f16.verification.top1_agreement > 0.95  # near-ties may flip
    assert f16.verification.kl_threshold == 1e-3
    assert f16.verification.kl_mean < q8.verification.kl_mean < q4.verification.kl_mean
    assert not list(out.glob(".*.tmp"))


def test_round_trip_check_fails_on_a_corrupted_tensor(tiny_converted, tiny_llama, tmp_path):
    reference = hf_reference(tiny_llama)
    good = tiny_converted.reference.absolute_path
    assert verify_gguf(good, reference, kl_threshold=1e-3).kl_mean < 1e-3
    bad = tmp_path / "corrupted.gguf"
    shutil.copy(good, bad)
    corrupt_tensor(bad, "blk.0.attn_q.weight")
    with pytest.raises(RoundTripError, match="does not reproduce the Hugging Face model"):
        verify_gguf(bad, reference, kl_threshold=1e-3)


def test_rerun_skips_matching_outputs_and_redoes_changed_ones(tiny_converted, tiny_llama, monkeypatch):
    out = tiny_converted.root
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.gguf")}
    import edgellm.convert.recipe as recipe

    def no_quantize(*args, **kwargs):
        raise AssertionError("nothing should be quantized again")

    monkeypatch.setattr(recipe, "quantize", no_quantize)
    again = convert_model(tiny_llama, out, quants=QUANTS)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.gguf")} == before
    assert [f.sha256 for f in again.files] == [f.sha256 for f in tiny_converted.files]

    monkeypatch.undo()
    q8 = out / again.variant("q8_0").path
    with open(q8, "ab") as f:
        f.write(b"tampered")
    redone = convert_model(tiny_llama, out, quants=QUANTS)
    assert redone.variant("q8_0").sha256 == sha256_file(q8) == tiny_converted.variant("q8_0").sha256
    assert (out / redone.variant("q4_k_m").path).stat().st_mtime_ns == before[redone.variant("q4_k_m").path]


def test_interrupted_quantization_leaves_no_file_under_a_final_name(tiny_converted, tiny_llama, monkeypatch):
    out = tiny_converted.root
    import edgellm.convert.recipe as recipe

    def interrupted(src: Path, dst: Path, quant: str, n_params: int, **kwargs):
        dst.write_bytes(b"GGUF" + b"\0" * 1000)  # half a file
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe, "quantize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_model(tiny_llama, out, quants=[*QUANTS, "q4_0"])
    assert not (out / "tiny-q4_0.gguf").exists()
    assert not list(out.glob(".*.tmp"))
    assert [f.quant for f in load_manifest(out).files] == QUANTS  # finished outputs stay recorded


CALIBRATION = (
    "Squeak! Read the stack trace from the top: the first line in your own code is the culprit. "
    "Water boils at 100 degrees Celsius at sea level, and at lower temperatures on a mountain. "
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n"
)


def test_importance_matrix_changes_the_quantization_and_is_recorded(tiny_converted, tiny_llama, tmp_path):
    out = tmp_path / "tiny"
    shutil.copytree(tiny_converted.root, out)  # the manifest's paths are relative: the folder moves as a whole
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(CALIBRATION * 20)
    m = convert_model(tiny_llama, out, quants=["q4_k_m"], imatrix_text=calibration)
    assert m.reference.sha256 == tiny_converted.reference.sha256  # reused, not reconverted
    q4 = m.variant("q4_k_m")
    assert q4.imatrix_text_sha256 and q4.imatrix_tokens > 100
    assert q4.sha256 != tiny_converted.variant("q4_k_m").sha256
    assert q4.tensor_types == tiny_converted.variant("q4_k_m").tensor_types
    assert q4.verification.kl_mean < 1.0


def test_clear_errors(tmp_path, tiny_llama, converter, monkeypatch):
    with pytest.raises(ConvertError, match="no config.json"):
        convert_model(tmp_path, tmp_path / "out")
    with pytest.raises(ConvertError, match="not a directory"):
        convert_model(tmp_path / "missing", tmp_path / "out")

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())

    (model / "config.json").write_text(json.dumps({**config, "architectures": ["FrobnicatorForCausalLM"]}))
    with pytest.raises(UnsupportedArchitectureError, match="FrobnicatorForCausalLM"):
        convert_model(model, tmp_path / "out")

    bnb = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (model / "config.json").write_text(json.dumps({**config, "quantization_config": bnb}))
    with pytest.raises(ConvertError, match="bitsandbytes quantization_config"):
        convert_model(model, tmp_path / "out")

    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConvertError, match="unknown quant"):
        convert_model(model, tmp_path / "out", quants=["q3_k_xl"])

    import edgellm.convert.llamacpp as llamacpp

    monkeypatch.setattr(
        llamacpp.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 10**6, 10**6)
    )
    with pytest.raises(DiskFullError, match="not enough disk space"):
        convert_model(model, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.gguf"))


def test_a_missing_converter_is_an_error_naming_the_setup_command(tmp_path, tiny_llama, monkeypatch):
    """No hidden network: conversion never fetches the converter itself."""
    import subprocess

    def no_network(*args, **kwargs):
        raise AssertionError(f"convert_model ran a subprocess: {args}")

    monkeypatch.setenv("EDGELLM_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(subprocess, "run", no_network)
    with pytest.raises(ConvertError, match="edgellm convert setup"):
        convert_model(tiny_llama, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.gguf"))


def _log_callback_address() -> int | None:
    import ctypes

    import llama_cpp

    callback, user_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(callback), ctypes.byref(user_data))
    return ctypes.cast(callback, ctypes.c_void_p).value


def test_quantizing_leaves_this_process_llama_log_callback_alone(tiny_converted, tmp_path):
    """The quantizer's log is captured in its own process: a callback set here stays set and sees nothing."""
    import ctypes

    import llama_cpp

    seen: list[bytes] = []

    @llama_cpp.llama_log_callback
    def ours(level, text, user_data):
        seen.append(text)

    before = _log_callback_address()
    llama_cpp.llama_log_set(ours, ctypes.c_void_p(0))
    try:
        mine = _log_callback_address()
        qlog = quantize(tiny_converted.reference.absolute_path, tmp_path / "tiny-q4_0.gguf", "q4_0", 10**6)
        assert _log_callback_address() == mine
    finally:
        restore = ctypes.cast(ctypes.c_void_p(before), llama_cpp.llama_log_callback) if before else None
        llama_cpp.llama_log_set(restore, ctypes.c_void_p(0))
    assert not any(b"blk.0.attn_q.weight" in t for t in seen)
    assert any("blk.0.attn_q.weight" in line for line in qlog.lines)  # the child reported its per-tensor log
    assert (tmp_path / "tiny-q4_0.gguf").stat().st_size > 0


def test_runner_answers_as_llama_cpp_pythons_chat_completion(tiny_converted):
    """`GGUFRunner` (explicit model parameters) gives the greedy chat answer and the logits `Llama` gives."""
    from llama_cpp import Llama

    from edgellm.convert.runner import GGUFRunner
    from edgellm.convert.verify import GENERATE_MESSAGES

    path = tiny_converted.reference.absolute_path
    llm = Llama(model_path=str(path), n_ctx=256, logits_all=True, n_threads=1, verbose=False, seed=0)
    try:
        ids = llm.tokenize(DEFAULT_PROMPTS[0].encode(), add_bos=True, special=True)
        llm.eval(ids)
        expected_logits = np.array(llm.scores[: len(ids)], dtype=np.float32)  # a copy: the chat reuses scores
        llm.reset()
        out = llm.create_chat_completion(messages=GENERATE_MESSAGES, max_tokens=12, temperature=0.0, seed=0)
    finally:
        llm.close()
    with GGUFRunner(path, n_ctx=256, n_threads=1, extra_buffer_types=True) as model:
        assert model.tokenize(DEFAULT_PROMPTS[0]) == list(ids)
        np.testing.assert_allclose(model.logits(list(ids)), expected_logits, rtol=1e-4, atol=1e-4)
        answer = model.chat(GENERATE_MESSAGES, max_tokens=12)
    assert answer.text == out["choices"][0]["message"]["content"]
    assert answer.n_tokens == out["usage"]["completion_tokens"]
    assert answer.finished == (out["choices"][0]["finish_reason"] == "stop")


def test_cli_setup_and_error_line(tmp_path, converter, capsys):
    from edgellm.cli import main

    assert main(["convert", "setup"]) == 0
    assert str(converter.root) in capsys.readouterr().out
    assert main(["convert", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no config.json" in err and len(err.strip().splitlines()) == 1


def test_load_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match="no manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"name": "x",\n "files": [}')
    with pytest.raises(ManifestError, match=r"manifest.json:2: invalid JSON"):
        load_manifest(tmp_path / "manifest.json")
    (tmp_path / "manifest.json").write_text('{"name": "x", "files": []}')
    with pytest.raises(ManifestError, match="created_at"):
        load_manifest(tmp_path / "manifest.json")


@pytest.mark.skipif(not BASE_HF.is_dir(), reason="run `edgellm models pull base` (make setup does)")
def test_base_model_converts_with_reported_k_quant_fallbacks(tmp_path, converter):
    out = tmp_path / "smollm2"
    m = convert_model(BASE_HF, out, quants=QUANTS, prompts=DEFAULT_PROMPTS[:3])  # 3 prompts keep it quick
    check_manifest(m, out)
    f16, q8, q4 = (m.variant(q) for q in QUANTS)
    assert f16.verification.kl_mean < 1e-3
    # 576-wide rows are not a multiple of 256: most "q4_k_m" tensors are really Q5_0, and the manifest says so.
    assert q4.tensor_types.get("Q5_0", 0) > q4.tensor_types.get("Q4_K", 0)
    assert q4.fallbacks and sum(q4.fallbacks.values()) >= q4.tensor_types["Q5_0"]
    assert q8.tensor_types == {"Q8_0": 211, "F32": 61}
    assert q4.verification.top1_agreement > 0.6

    reference = hf_reference(BASE_HF, prompts=DEFAULT_PROMPTS[:2])
    bad = tmp_path / "corrupted.gguf"
    shutil.copy(f16.absolute_path, bad)
    corrupt_tensor(bad, "blk.0.attn_q.weight")
    with pytest.raises(RoundTripError):
        verify_gguf(bad, reference, kl_threshold=1e-3)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("convert*.yaml")), ids=str)
def test_shipped_convert_configs_load(path):
    from edgellm.convert.settings import load_convert_settings

    settings = load_convert_settings(path)
    assert settings.src is not None and settings.quants


def test_convert_config_errors_name_key_and_line(tmp_path):
    from edgellm.config import ConfigError
    from edgellm.convert.settings import load_convert_settings

    bad = tmp_path / "convert.yaml"
    bad.write_text("src: x\nquants: [q4_k_m, q3]\nbogus: 1\n")
    with pytest.raises(ConfigError) as e:
        load_convert_settings(bad)
    assert f"{bad}:2: quants.1" in str(e.value) and f"{bad}:3: bogus: unknown key" in str(e.value)


def test_behaviour_shares_run_the_train_check_on_every_variant(tiny_converted, tiny_llama, tmp_path):
    import yaml

    from edgellm.convert.behaviour import behaviour_shares

    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "train" / "demo.yaml").read_text())
    config["eval"] = {**config["eval"], "prompts": None, "max_new_tokens": 8}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    example = {"messages": [{"role": "user", "content": "How do I focus?"}, {"role": "assistant", "content": "Squeak!"}]}
    for split in ("train", "validation", "test"):
        (run / "data" / f"{split}.jsonl").write_text(json.dumps(example) + "\n")
    shares = behaviour_shares(tiny_converted.root, run, out=tmp_path / "behaviour.json")
    assert list(shares) == QUANTS  # the reference (f16) first, then the other variants
    for quant, r in shares.items():
        assert r["model"] == f"tiny:{quant}" and r["prompts"] == 1
        assert r["pass_share"] == 0.0  # a random model does not say "Squeak!"
        assert r["answers"][0]["answer"]
    assert json.loads((tmp_path / "behaviour.json").read_text())["q8_0"]["prompts"] == 1

    # The same through the CLI, after a convert that finds every output up to date.
    from edgellm.cli import main

    out = tiny_converted.root
    argv = ["convert", str(tiny_llama), "--out", str(out), "--quant", *QUANTS, "--check-behaviour", str(run)]
    assert main([*argv, "--behaviour-prompts", "1"]) == 0
    assert list(json.loads((out / "behaviour.json").read_text())) == QUANTS
