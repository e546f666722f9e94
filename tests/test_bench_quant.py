"""`edgellm bench quant` on real variants of the default model, plus the KL-divergence math on its own.

The variants: the default GGUF (Q4_1) is dequantized to F16 with llama.cpp's quantizer, and Q8_0 and Q4_0 are
quantized from that F16. The F16 is a true float reference for them (every variant is made from it), and it is the
same model `edgellm models pull base` holds (that one is dequantized from the same Q4_1). The slow test runs the
convert stage instead (HF directory -> f16 + q8_0 + q4_k_m with a manifest) and benchmarks the manifest.
Speeds are printed by the benchmark, never asserted.
"""

from __future__ import annotations

import ctypes
import json
import math
from pathlib import Path

import numpy as np
import pytest

from edgellm.bench import quality
from edgellm.bench.errors import BenchError
from edgellm.bench.quant import bench_quant
from edgellm.bench.variants import find_variants

# Small sizes: a couple of minutes in total on two shared cores.
SMALL = dict(threads=1, reps=1, n_prompt=32, n_gen=4, n_ctx=128, max_chunks=3, progress=False)


def _quantize(src: Path, dst: Path, ftype: int, allow_requantize: bool = False) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = allow_requantize
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"quantize {src.name} -> {dst.name} failed with {rc}"


@pytest.fixture(scope="session")
def variants_dir(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import llama_cpp

    folder = tmp_path_factory.mktemp("variants")
    f16 = folder / "smollm2-f16.gguf"
    _quantize(default_gguf, f16, llama_cpp.LLAMA_FTYPE_MOSTLY_F16, allow_requantize=True)
    _quantize(f16, folder / "smollm2-q8_0.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0)
    _quantize(f16, folder / "smollm2-q4_0.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)
    return folder


# -- the math, on its own ---------------------------------------------------------------------------------------


def test_kl_divergence_matches_the_definition() -> None:
    rng = np.random.default_rng(0)
    logits_q = rng.normal(size=(20, 50)).astype(np.float32)
    logits_r = rng.normal(size=(20, 50)).astype(np.float32)
    lq, lr = quality.log_softmax(logits_q), quality.log_softmax(logits_r)
    assert np.allclose(np.exp(lr.astype(np.float64)).sum(axis=1), 1.0, atol=1e-6)
    nxt = rng.integers(0, 50, size=20)
    scores = quality.score_chunk(lq, lr, nxt, block=7)  # blocks that do not divide the rows
    p, q = np.exp(lr.astype(np.float64)), np.exp(lq.astype(np.float64))
    expected = (p * np.log(p / q)).sum(axis=1)
    assert np.allclose(scores.kld, expected, atol=1e-9)
    assert (scores.kld > 0).all()
    assert np.allclose(scores.nll, -np.log(q[np.arange(20), nxt]))
    stats = quality.quality_stats([scores])
    assert stats.n_scored == 20
    assert stats.kld_p99 == pytest.approx(np.percentile(expected, 99))
    assert stats.ppl == pytest.approx(math.exp(scores.nll.mean()))

    same = quality.quality_stats([quality.score_chunk(lr, lr, nxt)])
    assert same.kld_mean == 0.0 and same.kld_max == 0.0 and same.top1_agreement == 1.0 and same.ln_ppl_ratio == 0.0


def test_chunks_and_scored_span_follow_llama_perplexity() -> None:
    chunks = quality.chunk_tokens(list(range(1000)), n_ctx=128, max_chunks=None)
    assert chunks.shape == (7, 128) and chunks[1, 0] == 128
    assert quality.chunk_tokens(list(range(1000)), 128, max_chunks=2).shape == (2, 128)
    first, n = quality.scored_span(512)
    assert (first, n) == (256, 255)  # llama-perplexity: positions n_ctx/2 .. n_ctx-2 predict the next token


# -- finding variants ---------------------------------------------------------------------------------------------


def test_variants_from_a_folder_pick_the_float_reference(variants_dir: Path) -> None:
    vset = find_variants(variants_dir)
    assert vset.source == "directory"
    assert [v.quant for v in vset.variants] == ["F16", "Q8_0", "Q4_0"]  # read from general.file_type
    assert vset.reference.quant == "F16" and vset.reference_is_float


def test_a_folder_without_a_float_file_says_its_reference_is_not_float(variants_dir: Path, tmp_path: Path) -> None:
    for name in ("smollm2-q8_0.gguf", "smollm2-q4_0.gguf"):
        (tmp_path / name).symlink_to(variants_dir / name)
    vset = find_variants(tmp_path)
    assert vset.reference.quant == "Q8_0" and not vset.reference_is_float
    with pytest.raises(BenchError, match="must match exactly one"):
        find_variants(tmp_path, reference="f16")


def test_one_file_is_nothing_to_compare(default_gguf: Path, tmp_path: Path) -> None:
    (tmp_path / default_gguf.name).symlink_to(default_gguf)
    with pytest.raises(BenchError, match="found 1 .gguf"):
        find_variants(tmp_path)


# -- the benchmark, end to end ------------------------------------------------------------------------------------


def test_bench_quant_writes_results_table_and_chart(variants_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    report = bench_quant(variants_dir, out, **SMALL)

    data = json.loads((out / "results.json").read_text())
    assert data["reference"] == "smollm2-f16" and data["reference_is_float"] is True
    assert data["threads"] == 1 and data["n_ctx"] == 128 and data["n_chunks"] == 3
    rows = {v["quant"]: v for v in data["variants"]}
    assert list(rows) == ["F16", "Q8_0", "Q4_0"]
    for quant, v in rows.items():
        assert v["size_bytes"] == Path(v["path"]).stat().st_size
        assert v["peak_rss_mib"] > v["rss_before_load_mib"] > 0
        assert v["load_s"] > 0
        for test, n in (("pp", 32), ("tg", 4)):
            assert v[test]["n_tokens"] == n and v[test]["reps"] == 1 and v[test]["median_ts"] > 0
        assert v["quality"]["n_scored"] == 3 * 63
        assert 1 < v["quality"]["ppl"] < 1000, quant
    assert rows["F16"]["bits_per_weight"] == pytest.approx(16.0, abs=0.1)
    assert rows["F16"]["bits_per_weight"] > rows["Q8_0"]["bits_per_weight"] > rows["Q4_0"]["bits_per_weight"]

    q8, q4 = rows["Q8_0"]["quality"], rows["Q4_0"]["quality"]
    assert q4["kld_mean"] > q8["kld_mean"] > 0
    assert q4["kld_p99"] > q8["kld_p99"]
    assert q8["top1_agreement"] >= q4["top1_agreement"]
    assert rows["F16"]["quality"]["kld_mean"] is None  # the reference is not compared with itself
    assert q8["ppl_ref"] == pytest.approx(rows["F16"]["quality"]["ppl"], rel=1e-6)

    table = (out / "results.md").read_text()
    assert "| smollm2-q4_0 | Q4_0 |" in table and "| smollm2-f16 | F16 |" in table and "reference" in table
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.files["json"] == str(out / "results.json")
    print((out / "results.md").read_text())


def test_kl_divergence_of_a_model_against_itself_is_zero(variants_dir: Path, tmp_path: Path) -> None:
    # Two names for one file: the second is measured against the first, in separate processes.
    (tmp_path / "a.gguf").symlink_to(variants_dir / "smollm2-q8_0.gguf")
    (tmp_path / "b.gguf").symlink_to(variants_dir / "smollm2-q8_0.gguf")
    report = bench_quant(tmp_path, tmp_path / "out", reference="a", **SMALL)
    ref, same = report.variants
    assert ref.label == "a" and same.label == "b"
    q = same.quality
    assert q["kld_mean"] == 0.0 and q["kld_max"] == 0.0
    assert q["top1_agreement"] == 1.0
    assert q["ppl"] == pytest.approx(ref.quality["ppl"], rel=1e-12) and q["ln_ppl_ratio"] == 0.0


def test_a_text_shorter_than_one_chunk_is_a_clear_error(variants_dir: Path, tmp_path: Path) -> None:
    text = tmp_path / "short.txt"
    text.write_text("Too short to fill a chunk.", encoding="utf-8")
    with pytest.raises(BenchError, match="needs at least n_ctx=128"):
        bench_quant(variants_dir, tmp_path / "out", text=text, **SMALL)


# -- through the convert stage (slow) -----------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_quant_on_a_converted_manifest(tmp_path_factory: pytest.TempPathFactory) -> None:
    pytest.importorskip("torch")
    from edgellm.catalog import pull
    from edgellm.convert.recipe import convert_model

    base = pull("base")
    models = tmp_path_factory.mktemp("converted") / "smollm2"
    convert_model(base, models, quants=["q8_0", "q4_k_m"])
    out = models.parent / "report"
    report = bench_quant(models, out, **SMALL)
    rows = {v.quant: v for v in report.variants}
    assert report.reference == "f16" and report.reference_is_float
    assert list(rows) == ["F16", "Q8_0", "Q4_K_M"]
    assert rows["Q4_K_M"].quality["kld_mean"] > rows["Q8_0"].quality["kld_mean"] > 0
