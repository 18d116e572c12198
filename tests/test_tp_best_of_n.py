"""The verifier learns a toy rule (held-out accuracy above chance) and, as best-of-N reranker in
solver_evaluate, picks the samples the rule calls correct."""

from __future__ import annotations

import json
import random

import pytest
import torch

from rlhf.tp.solver_evaluate import best_of_n


def toy_rows(n: int, seed: int = 1) -> list[dict]:
    """solver_evaluate-style samples, two per question (``n`` rows): a solution is correct exactly when its
    final answer is even. Each question has one even and one odd sample, so nothing but the answer tells
    them apart (with correctness tied to the question, a verifier may learn the question instead)."""
    rng = random.Random(seed)
    rows = []
    for q in range(n // 2):
        values = [rng.randint(5, 49) * 2, rng.randint(5, 49) * 2 + 1]
        rng.shuffle(values)
        rows += [{"question": f"Q{q}: pick a number", "output": f" I pick {v}\n#### {v}", "correct": v % 2 == 0}
                 for v in values]  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def toy_verifier(tiny_model_factory, tmp_path_factory):
    from rlhf.tp import verifier_train
    from rlhf.tp.distributed import shutdown

    root = tmp_path_factory.mktemp("toy_verifier")
    (root / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_rows(64)))
    results = verifier_train.main(
        ["--ckpt_dir", str(tiny_model_factory("llama")), "--save_dir", str(root / "v"), "--train_file",
         str(root / "samples.jsonl"), "--max_batch_size", "16", "--lr", "3e-3", "--epochs", "24",
         "--eval_ratio", "0.25", "--lr_scheduler_type", "constant", "--lora_rank", "-1"]
    )  # fmt: skip
    shutdown()
    return root, results


def test_best_of_n_picks_the_highest_score():
    predictions = [{"correct": c} for c in (False, True, False, True, False, False)]
    accuracy = best_of_n(predictions, [0.1, 0.9, -1.0, 0.2, 0.5, 0.7], num_samples=3)
    assert accuracy == 0.5  # q0 picks the correct sample 1; q1 picks its wrong third sample (0.7)
    assert [p["verifier_score"] for p in predictions] == [0.1, 0.9, -1.0, 0.2, 0.5, 0.7]


def test_verifier_learns_toy_rule(toy_verifier):
    root, results = toy_verifier
    chance = max(results["eval_positive_share"], 1 - results["eval_positive_share"])
    assert results["eval_accuracy"] > max(chance, 0.75), results
    assert results["final_loss"] < results["first_loss"]
    assert json.loads((root / "v/params.json").read_text())["head"] == "scalar"


def test_verifier_reranks_samples(toy_verifier, tiny_llama, tmp_path):
    """Two samples per question, one even (correct by the rule) and one odd: the verifier's best-of-2
    beats the samples' own accuracy, and the scores in predictions.jsonl are the verifier's."""
    from rlhf.models import load_tokenizer
    from rlhf.tp.distributed import init_model_parallel, shutdown
    from rlhf.tp.loading import load_tp_model
    from rlhf.tp.solver_evaluate import SolverEvaluateArguments, rank_with_verifier
    from rlhf.tp.verifier import score_solutions

    root, _ = toy_verifier
    rng = random.Random(7)
    predictions = []
    for q in range(8):
        even, odd = rng.randint(5, 49) * 2, rng.randint(5, 49) * 2 + 1
        for value in (odd, even) if q % 2 else (even, odd):
            predictions.append({"question": f"Q{100 + q}: pick a number", "output": f" I pick {value}\n#### {value}",
                                "correct": value % 2 == 0})  # fmt: skip
    args = SolverEvaluateArguments(ckpt_dir=str(tiny_llama), log_dir="-", label_file="-", num_samples=2,
                                   temperature=1.0, verifier_ckpt_dir=str(root / "v"))  # fmt: skip
    try:
        rank, world_size = init_model_parallel()
        accuracy = rank_with_verifier(args, predictions, rank, world_size, torch.device("cpu"))
        model = load_tp_model(
            str(root / "v"), rank=0, world_size=1, device=torch.device("cpu"), scalar_head=True
        )
        tokenizer = load_tokenizer(str(root / "v"))
        direct = score_solutions(
            model.eval(), tokenizer, [(p["question"], p["output"]) for p in predictions], 3
        )
    finally:
        shutdown()
    assert accuracy >= 0.75 > 0.5  # sample accuracy is 0.5 by construction
    assert [p["verifier_score"] for p in predictions] == pytest.approx(
        direct, abs=1e-5
    )  # batching-independent
