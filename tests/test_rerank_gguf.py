"""The llama.cpp reranker backend: the default cross-encoder converted by `edgellm convert` (its pooler kept, RANK
pooling, segment ids as input embeddings), checked against sentence-transformers, and the pitfalls it fixes measured.

The conversion's own parity gate (convert/encoder.py) runs on the project's held-out data; these tests check the
serving engine (serve/engine/rerank.py GGUFReranker, many pairs per llama_decode) against sentence-transformers too.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgellm.serve.engine.rerank import (
    CrossEncoderReranker,
    GGUFReranker,
    RerankError,
    RerankInputError,
    RerankModelError,
    load_reranker,
    longest_first,
)

QUERY = "How do I recursively copy a directory tree to another location?"
DOCUMENTS = [
    "shutil.copytree(src, dst): Recursively copy an entire directory tree rooted at src to a directory named dst.",
    "json.dumps(obj): Serialize obj to a JSON formatted string.",
    "Press a clean cloth firmly on the wound and hold it there for several minutes.",
    "Copy Tree, the garden centre, is how the town gets its directory of plants.",
    "os.walk(top): Directory tree generator.",
]


def default_reranker_gguf() -> Path:
    """The default cross-encoder as a GGUF (`edgellm models pull reranker-gguf`); converted here if missing or if it
    was converted from another training run of the cross-encoder."""
    from edgellm.catalog import pull
    from edgellm.convert.encoder import PARITY_NAME
    from edgellm.convert.recipe import hash_directory
    from edgellm.paths import models_dir

    source = pull("reranker")
    dest = models_dir() / "reranker-minilm-l6-gguf"
    if (dest / PARITY_NAME).is_file():
        record = json.loads((dest / PARITY_NAME).read_text())
        if record["source"]["sha256"] != hash_directory(source):
            shutil.rmtree(dest)
    return pull("reranker-gguf") / "reranker-minilm-l6-f16.gguf"


@pytest.fixture(scope="session")
def reranker_gguf() -> Path:
    return default_reranker_gguf()


@pytest.fixture(scope="session")
def reranker_dir(reranker_gguf: Path) -> Path:
    from edgellm.catalog import pull

    return pull("reranker")


@pytest.fixture(scope="module")
def gguf(reranker_gguf: Path):
    with GGUFReranker(reranker_gguf, name="gguf", max_length=256, n_batch=256) as r:
        yield r


@pytest.fixture(scope="module")
def st(reranker_dir: Path):
    with CrossEncoderReranker(reranker_dir, name="st", batch_size=16) as r:
        yield r


def logits(reranker, query: str, documents: list[str], **kw: object) -> np.ndarray:
    out = reranker.rerank(query, documents, raw_scores=True, **kw)
    by_index = {r.index: r.relevance_score for r in out.results}
    return np.array([by_index[i] for i in range(len(documents))])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from edgellm.convert.encoder import spearman as rho

    return rho(a, b)


# --- the conversion ---


def test_conversion_keeps_the_pooler_and_marks_rank_pooling(reranker_gguf: Path) -> None:
    from edgellm.gguf import read_header

    header = read_header(reranker_gguf)
    names = {t.name for t in header.tensors}
    assert {"cls.weight", "cls.bias", "cls.output.weight", "cls.output.bias", "token_types.weight"} <= names
    assert header.arch_value("pooling_type") == 4  # LLAMA_POOLING_TYPE_RANK


def test_parity_record_of_the_conversion(reranker_gguf: Path) -> None:
    record = json.loads((reranker_gguf.parent / "parity.json").read_text())
    assert record["kind"] == "reranker"
    assert record["thresholds"] == {"min_spearman": 0.99, "max_score_diff": 0.01}
    (entry,) = record["files"]
    parity = entry["parity"]
    assert parity["n_queries"] == 100 and parity["mean_spearman"] >= 0.99
    assert parity["max_score_diff"] <= 0.01 and parity["top1_agreement"] >= 0.95


def test_upstream_conversion_is_refused_with_the_measured_figure(
    reranker_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """llama.cpp's converter as shipped drops pooler.dense: the parity gate refuses the file, saying by how much.

    The gate runs on every tenth of its 100 parity queries (6 general, 4 docstring): scoring all of them twice, with
    sentence-transformers and llama.cpp, took a minute. On these 10 the file's order comes close (mean Spearman 0.989)
    but its logits are off by up to 3.0, so the score gate (0.01) refuses it if the rank gate does not."""
    from edgellm.convert import encoder
    from edgellm.convert.encoder import ParityError, convert_encoder
    from edgellm.train.reranker import parity_queries

    subset = parity_queries()[::10]
    monkeypatch.setattr(encoder.Reference, "queries", lambda self: subset)
    with pytest.raises(
        ParityError, match=r"does not (rank|score) as sentence-transformers does: .* threshold 0\.\d+"
    ):
        convert_encoder(reranker_dir, tmp_path / "upstream", name="upstream", converter_module=None, threads=1)
    assert not list((tmp_path / "upstream").glob("*.gguf"))  # a refused file is not kept


# --- the serving engine against sentence-transformers ---


def test_engine_matches_sentence_transformers_on_held_out_queries(gguf: GGUFReranker, st: CrossEncoderReranker) -> None:
    from edgellm.train.reranker import parity_queries

    # 13 queries (8 general, 5 docstring), 10 candidates each; the conversion's gate scored all 100
    # (test_parity_record_of_the_conversion)
    queries = parity_queries()[::8]
    rhos, diffs = [], []
    for query, docs in queries:
        ours, ref = logits(gguf, query, docs), logits(st, query, docs)
        rhos.append(spearman(ours, ref))
        diffs.append(float(np.abs(ours - ref).max()))
    assert np.mean(rhos) >= 0.99, rhos
    assert max(diffs) < 0.05, diffs


def test_scores_are_on_the_sentence_transformers_scale(gguf: GGUFReranker, st: CrossEncoderReranker) -> None:
    ours, ref = gguf.rerank(QUERY, DOCUMENTS), st.rerank(QUERY, DOCUMENTS)
    assert [r.index for r in ours.results] == [r.index for r in ref.results]
    for a, b in zip(ours.results, ref.results, strict=True):
        assert 0 <= a.relevance_score <= 1 and a.relevance_score == pytest.approx(b.relevance_score, abs=0.005)
    assert ours.prompt_tokens == ref.prompt_tokens


def test_long_documents_are_cut_as_hugging_face_cuts_them(gguf: GGUFReranker, st: CrossEncoderReranker) -> None:
    long_docs = [DOCUMENTS[0] + " directory tree" * 300, "copy " * 400]
    ours, ref = logits(gguf, QUERY, long_docs), logits(st, QUERY, long_docs)
    assert np.abs(ours - ref).max() < 0.05
    assert gguf.rerank(QUERY, long_docs).prompt_tokens == st.rerank(QUERY, long_docs).prompt_tokens == 2 * 256
    with pytest.raises(RerankInputError, match=r"documents\[0\] is \d+ tokens .* limit of 256"):
        gguf.rerank(QUERY, long_docs, truncate=False)


def test_longest_first_is_the_fast_tokenizers_rule(st: CrossEncoderReranker) -> None:
    tokenizer = st._tokenizer
    for n1, n2 in [(5, 400), (400, 5), (300, 300), (120, 130), (10, 20), (250, 8)]:
        q, d = " ".join(["alpha"] * n1), " ".join(["beta"] * n2)
        ids = tokenizer(q, d, truncation="longest_first", max_length=256)["input_ids"]
        sep = ids.index(tokenizer.sep_token_id)
        assert longest_first(n1, n2, 253) == (sep - 1, len(ids) - sep - 2), (n1, n2)


def test_many_pairs_in_one_decode_equal_one_by_one(gguf: GGUFReranker) -> None:
    docs = DOCUMENTS * 8  # 40 pairs: several per llama_decode
    together = logits(gguf, QUERY, docs)
    alone = np.array([logits(gguf, QUERY, [d])[0] for d in DOCUMENTS])
    # the same up to llama.cpp's rounding, which depends on the batch's shape (~1e-3 here)
    assert np.allclose(together[: len(DOCUMENTS)], alone, atol=5e-3)
    assert np.allclose(together.reshape(8, -1), alone, atol=5e-3)
    assert (np.argsort(-together.reshape(8, -1), axis=1) == np.argsort(-alone)).all()


def test_engine_contract(gguf: GGUFReranker) -> None:
    full = gguf.rerank(QUERY, DOCUMENTS).results
    assert full[0].index == 0
    assert [r.index for r in gguf.rerank(QUERY, DOCUMENTS, top_n=2).results] == [r.index for r in full[:2]]
    raw = {r.index: r.relevance_score for r in gguf.rerank(QUERY, DOCUMENTS, raw_scores=True).results}
    for r in full:
        assert 1 / (1 + math.exp(-raw[r.index])) == pytest.approx(r.relevance_score, abs=1e-6)
    for bad, message in [((QUERY, []), "documents is empty"), (("", ["a"]), "query is empty")]:
        with pytest.raises(RerankInputError, match=message):
            gguf.rerank(*bad)


# --- the pitfalls, measured ---


def test_all_zero_token_types_change_the_scores(reranker_gguf: Path, st: CrossEncoderReranker) -> None:
    """llama.cpp adds token_types row 0 everywhere; without the input-embedding fix a pair's document is scored as
    segment 0 and the scores move far beyond the parity tolerance."""
    with GGUFReranker(reranker_gguf, name="zero-types", max_length=256, segment_ids=False) as zero:
        wrong = logits(zero, QUERY, DOCUMENTS)
    ref = logits(st, QUERY, DOCUMENTS)
    score = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    assert np.abs(score(wrong) - score(ref)).max() > 0.01


def test_wrong_kinds_of_file_are_refused(reranker_gguf: Path, tmp_path: Path) -> None:
    from edgellm.serve.engine.embed import EmbedModelError, GGUFEmbedder
    from tests.test_embeddings import default_embedder_gguf

    with pytest.raises(RerankModelError, match="not a cross-encoder"):
        GGUFReranker(default_embedder_gguf(), name="x")
    with pytest.raises(EmbedModelError, match="cross-encoder"):
        GGUFEmbedder(reranker_gguf, name="x")
    with pytest.raises(RerankModelError, match="edgellm models pull reranker-gguf"):
        GGUFReranker(tmp_path / "missing.gguf", name="x")
    with pytest.raises(RerankModelError, match="max_length 4096 is more than"):
        GGUFReranker(reranker_gguf, name="x", max_length=4096)


def test_load_reranker_picks_the_backend(reranker_gguf: Path) -> None:
    r = load_reranker(None, reranker_gguf, name="auto", max_documents=3)
    assert isinstance(r, GGUFReranker) and r.max_documents == 3
    r.close()
    r.close()  # twice is fine
    with pytest.raises(RerankError, match="closed"):
        r.rerank(QUERY, ["a"])
