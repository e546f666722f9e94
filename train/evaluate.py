"""`edgellm train eval runs/<name>`: did the fine-tune change the model, measured on data it never trained on?

For each adapter folder: the loss and perplexity on the test split of the base and of the merged model; ROUGE-L
(F1, ``rouge-score``) and BLEU (``sacrebleu``) of their greedy answers to the test split's prompts against its
reference answers; and the behaviour check (`train.behaviour`) on greedy answers to held-out prompts (the test
split's prompts and, optionally, a file of prompts unlike the training ones): the share of answers that pass every
behaviour the run's ``eval`` sets (a prefix, a closing line, numbered steps, a word limit). Results go to
``<folder>/eval.json``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from edgellm.errors import EdgeLLMError
from edgellm.fsutil import atomic_write_text
from edgellm.train import data as D
from edgellm.train.behaviour import check_answer, has_behaviour, held_out_prompts, shares
from edgellm.train.config import load_train_config
from edgellm.train.merge import adapter_folders
from edgellm.train.modeling import base_model_dir, load_tokenizer, mean_loss, perplexity, pick_device

log = logging.getLogger(__name__)


def evaluate_run(run: Path, models: tuple[str, ...] = ("base", "merged")) -> list[dict[str, Any]]:
    return [evaluate_folder(folder, models) for folder in adapter_folders(run)]


def evaluate_folder(folder: Path, which: tuple[str, ...] = ("base", "merged")) -> dict[str, Any]:
    """Evaluate the base and/or the merged model; results for a model not re-evaluated are kept from an earlier
    ``eval.json`` made with the same prompts (so the base can be measured while the adapter trains)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = load_train_config(folder / "config.yaml")
    merged_dir = folder / "merged"
    if "merged" in which and not (merged_dir / "config.json").is_file():
        raise EdgeLLMError(f"{merged_dir} is missing; run `edgellm train merge {folder}` first")
    device = pick_device(config.device)
    base_path = base_model_dir(config.base_model)
    tokenizer = load_tokenizer(base_path)
    test = D.read_split(folder / "data")["test"]
    rows = [D.encode(tokenizer, ex.as_messages(), config.data.loss_on) for ex in test]
    prompts = held_out_prompts(config.eval, test)
    models = {"base": base_path, "merged": str(merged_dir)}

    result: dict[str, Any] = {
        "folder": str(folder),
        "test_examples": len(rows),
        "prompts": len(prompts),
        "eval": config.eval.model_dump(mode="json"),
        "models": {},
    }
    previous = folder / "eval.json"
    same = ("test_examples", "prompts", "eval")
    if previous.is_file():
        old = json.loads(previous.read_text(encoding="utf-8"))
        if all(old.get(k) == result[k] for k in same):
            result["models"] = {k: v for k, v in old.get("models", {}).items() if k not in which}
    for label in which:
        path = models[label]
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model = model.to(device).eval()
        started = time.perf_counter()
        loss = mean_loss(model, rows, tokenizer.pad_token_id, device) if rows else None
        answers = generate(
            model, tokenizer, prompts, config.eval.max_new_tokens, config.eval.batch_size, device
        )
        checks = [check_answer(a, done, config.eval) for a, done in answers]
        summary: dict[str, Any] = {
            "path": path,
            "test_loss": loss,
            "test_perplexity": perplexity(loss) if loss is not None else None,
            "seconds": round(time.perf_counter() - started, 1),
        }
        on_test = [a for (a, _), p in zip(answers, prompts, strict=True) if p["set"] == "test"]
        if on_test:
            summary.update(reference_scores(on_test, [reference_answer(ex) for ex in test]))
        if has_behaviour(config.eval):
            summary.update(shares(checks, config.eval))
            summary["pass_share_extra_prompts"] = _share(
                [c for c, p in zip(checks, prompts, strict=True) if p["set"] == "extra"]
            )
            summary["pass_share_test_split"] = _share(
                [c for c, p in zip(checks, prompts, strict=True) if p["set"] == "test"]
            )
        summary["answers"] = [
            p | {"answer": a} | c for p, (a, _), c in zip(prompts, answers, checks, strict=True)
        ]
        result["models"][label] = summary
        log.info(
            "%s: test loss %s, ROUGE-L %s, BLEU %s, pass share %s",
            label,
            loss,
            summary.get("rouge_l"),
            summary.get("bleu"),
            summary.get("pass_share"),
        )
        del model
    atomic_write_text(folder / "eval.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def reference_answer(example: D.Example) -> str:
    """The last assistant turn of a test example: what a greedy answer to its prompt is scored against."""
    return [m["content"] for m in example.as_messages() if m["role"] == "assistant"][-1]


def reference_scores(answers: list[str], references: list[str]) -> dict[str, float]:
    """``rouge_l``: mean ROUGE-L F1 (``rouge-score``, Porter stemming), 0-1; ``bleu``: corpus BLEU (``sacrebleu``,
    its default 13a tokenization), 0-100; of ``answers`` against one reference each."""
    if len(answers) != len(references):
        raise EdgeLLMError(f"{len(answers)} answers for {len(references)} reference answers")
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(ref, ans)["rougeL"].fmeasure for ans, ref in zip(answers, references, strict=True)]
    bleu = sacrebleu.corpus_bleu(answers, [references]).score
    return {"rouge_l": sum(rouge) / max(len(rouge), 1), "bleu": float(bleu), "reference_answers": len(references)}


def _share(checks: list[dict[str, Any]]) -> float | None:
    return sum(c["pass"] for c in checks) / len(checks) if checks else None


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[dict[str, Any]],
    max_new_tokens: int,
    batch_size: int,
    device: str,
) -> list[tuple[str, bool]]:
    """Greedy answers, batched with left padding; each with whether it ended (end-of-turn) before the limit."""
    import torch

    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    out: list[tuple[str, bool]] = []
    for i in range(0, len(prompts), batch_size):
        texts = [
            tokenizer.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True)
            for p in prompts[i : i + batch_size]
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
            )
        for row in gen[:, enc["input_ids"].shape[1] :]:
            ids = row.tolist()
            done = eos in ids
            if done:
                ids = ids[: ids.index(eos)]
            out.append((tokenizer.decode(ids, skip_special_tokens=True).strip(), done))
    return out
