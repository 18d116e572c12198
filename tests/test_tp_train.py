"""solver_train / verifier_train on the TP model: examples, a solver learning test at TP=1 (full and LoRA,
saved dirs evaluate and merge back), and the whole workflow at TP=2 under ``torchrun`` (solver -> verifier
-> best-of-N -> PPO -> evaluation of the PPO actor), launched once (see :func:`worker`)."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import GLOO_THREADS_AFTER, freed_process_groups, script_env, torchrun

from rlhf.data import split_rows
from rlhf.tp.examples import Example, collate

REPO_ROOT = Path(__file__).resolve().parents[1]


def addition_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append(
            {
                "question": f"What is {a} plus {b}?",
                "answer": f"{a}+{b}=<<{a}+{b}={a + b}>>{a + b}\n#### {a + b}",
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_predictions(log_dir: Path, name: str = "predictions.jsonl") -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (log_dir / name).read_text().splitlines()]
    return rows, json.loads((log_dir / "metrics.json").read_text())


def test_solver_example_masks_the_prompt(tiny_llama):
    from rlhf.models import load_tokenizer
    from rlhf.tp.prompt import gsm8k_prompt
    from rlhf.tp.solver_train import solver_example

    tokenizer = load_tokenizer(str(tiny_llama))
    example = solver_example("What is 1 plus 2?", "1+2=3\n#### 3", tokenizer, max_seq_len=512)
    n_prompt = len(tokenizer(gsm8k_prompt("What is 1 plus 2?"))["input_ids"])
    assert example.labels[:n_prompt] == [-100] * n_prompt
    assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
    assert example.input_ids[-1] == tokenizer.eos_token_id and example.input_ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(example.input_ids[n_prompt:], skip_special_tokens=True) == " 1+2=3\n#### 3"
    assert solver_example("What is 1 plus 2?", "3", tokenizer, max_seq_len=n_prompt) is None  # no answer left
    one = solver_example("What is 1 plus 2?", "1+2=3", tokenizer, max_seq_len=n_prompt + 1)  # was dropped
    assert (
        one.cut and one.labels[n_prompt:] == one.input_ids[n_prompt:] and len(one.input_ids) == n_prompt + 1
    )
    assert not example.cut
    cut = solver_example("What is 1 plus 2?", "1+2=3\n#### 3", tokenizer, max_seq_len=n_prompt + 3)
    assert cut.cut and len(cut.input_ids) == n_prompt + 3 and cut.input_ids[-1] != tokenizer.eos_token_id


def test_collate_and_split():
    batch = collate([Example([5, 6, 7], labels=[-100, 6, 7]), Example([8], labels=[8])], pad_id=0, dev="cpu")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["last"].tolist() == [2, 0]
    train, held = split_rows(list(range(20)), 0.25, seed=3)
    assert len(held) == 5 and sorted(train + held) == list(range(20))
    assert split_rows(list(range(20)), 0.25, seed=3) == (train, held)  # seeded
    assert split_rows([1, 2, 3], 0.0, seed=0) == ([1, 2, 3], [])


def test_flags_build_one_lora_spec_count_steps_and_schedule_warmup():
    from rlhf.args import parse_args
    from rlhf.errors import ConfigError
    from rlhf.models.lora import LoraSpec
    from rlhf.optimizer import build_adamw, warmup_step_count
    from rlhf.tp.train_args import TPTrainArguments

    base = ["--ckpt_dir", "c", "--save_dir", "s", "--train_file", "t"]
    (args,) = parse_args((TPTrainArguments,), base)
    spec = args.lora_spec()
    assert not spec.use_lora and spec.rank == -1  # full training by default, as the description's commands
    assert (spec.alpha, spec.dropout) == (LoraSpec().alpha, LoraSpec().dropout) and spec.targets == ["all"]
    (args,) = parse_args((TPTrainArguments,), base + ["--lora_rank", "8", "--lora_target", "q_proj,w2"])
    assert args.lora_spec() == LoraSpec(rank=8, alpha=32.0, dropout=0.05, targets=["q_proj", "w2"])
    (args,) = parse_args((TPTrainArguments,), base + ["--max_batch_size", "4", "--accumulation_steps", "2"])
    assert args.total_steps(9) == 1 and args.total_steps(17) == 2  # ceil(17 / 4) = 5 micro-batches -> 2 steps
    args.epochs = 3.0
    assert args.total_steps(17) == 7 and args.total_steps(1) == 1
    args.max_steps = 11
    assert args.total_steps(17) == 11

    assert (
        warmup_step_count(0.1, 95) == 10 and warmup_step_count(3, 95) == 3 and warmup_step_count(0, 95) == 0
    )
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer, schedule = build_adamw(
        [weight], lr=1.0, weight_decay=0.0, scheduler="linear", warmup=0.5, total_steps=4
    )
    lrs = []
    for _ in range(4):
        optimizer.step()
        schedule.step()
        lrs.append(schedule.get_last_lr()[0])
    assert lrs == pytest.approx([0.5, 1.0, 0.5, 0.0])  # lr(s) = s / 2 for s < 2, then (4 - s) / 2
    with pytest.raises(ConfigError, match="--lr_scheduler_type nope"):
        build_adamw([weight], lr=1.0, weight_decay=0.0, scheduler="nope", warmup=0, total_steps=4)


def test_save_dir_that_is_a_file_fails_before_loading(tmp_path, capsys):
    from rlhf.tp import solver_train

    (tmp_path / "file").write_text("keep me")
    argv = ["--ckpt_dir", str(tmp_path / "missing"), "--train_file", str(tmp_path / "missing.jsonl")]
    with pytest.raises(SystemExit) as exit_info:
        solver_train.main(argv + ["--save_dir", str(tmp_path / "file")])
    assert exit_info.value.code == 2
    assert f"error: --save_dir {tmp_path / 'file'} is a file, not a directory" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "keep me"


def test_float16_training_is_refused_and_evaluation_is_not():
    """The TP trainers have no fp16 loss scaler (float16 gradients underflow): training in float16
    is a one-line error naming the flag, on any machine; evaluation may load float16 weights."""
    from rlhf.errors import ConfigError
    from rlhf.tp.loading import resolve_tp_dtype

    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="^--dtype float16: the tensor-parallel trainers have no fp16"):
        resolve_tp_dtype("float16", cpu, training=True)
    assert resolve_tp_dtype("float16", cpu) == torch.float32  # no GPU: evaluation falls back, with a warning
    assert resolve_tp_dtype("bfloat16", torch.device("cuda"), training=True) == torch.bfloat16
    assert resolve_tp_dtype("auto", torch.device("cuda"), training=True) == torch.bfloat16


def test_held_out_rows_that_do_not_fit_are_named_not_counted_as_zero(
    tiny_llama, tmp_path, world_of_one, capfd
):
    """All held-out rows dropped for --max_seq_len used to log "(0 held out)" and skip evaluation silently."""
    from rlhf.tp import solver_train

    rows = addition_rows(10)
    _, held = split_rows(list(range(len(rows))), 0.1, 42)
    for i in held:
        rows[i]["question"] = "What is " + " plus ".join(["1"] * 40) + "?"
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    argv = (
        f"--ckpt_dir {tiny_llama} --train_file {data} --model_type llama --max_seq_len 64 --max_batch_size 4"
    )
    argv += f" --max_steps 1 --eval_ratio 0.1 --save_dir {tmp_path / 'out'}"
    results = solver_train.main(argv.split())
    assert results["eval_examples"] == 0 and "eval_loss" not in results
    expected = "--eval_ratio 0.1: no held-out example is left (those held out do not fit --max_seq_len 64)"
    assert expected in capfd.readouterr().err


def test_solver_learns_saves_evaluates_and_merges(tiny_llama, tmp_path, world_of_one):
    """Full fine-tuning lowers the answer loss; the shard dir evaluates and merges into an HF dir whose
    transformers logits equal the TP model's; LoRA saves its adapter and merges it into the shards."""
    from transformers import AutoModelForCausalLM

    import checkpoint_split
    from rlhf.tp import solver_evaluate, solver_train
    from rlhf.tp.loading import load_tp_model

    data = write_jsonl(tmp_path / "train.jsonl", addition_rows(24))
    common = ["--ckpt_dir", str(tiny_llama), "--train_file", str(data), "--model_type", "llama"]
    common += ["--max_batch_size", "8", "--max_seq_len", "64", "--log_steps", "2"]
    results = solver_train.main(
        common + ["--save_dir", str(tmp_path / "full"), "--lora_rank", "-1", "--lr", "3e-3", "--epochs", "6"]
    )
    assert results["final_loss"] < 0.6 * results["first_loss"], results
    log = [json.loads(x) for x in (tmp_path / "full/training/metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == results["steps"] and {"loss", "lr", "grad_norm", "tokens_per_second"} <= set(
        log[0]
    )
    params = json.loads((tmp_path / "full/params.json").read_text())
    assert params["head"] == "lm" and params["n_shards"] == 1

    metrics = solver_evaluate.main(
        ["--ckpt_dir", str(tmp_path / "full"), "--label_file", str(data), "--log_dir", str(tmp_path / "eval"),
         "--limit", "4", "--max_gen_len", "12"]
    )  # fmt: skip
    predictions, _ = read_predictions(tmp_path / "eval")
    assert metrics["accuracy"] == sum(p["correct"] for p in predictions) / len(predictions)
    assert all("=" in p["output"] for p in predictions)  # the answers' format is being learned

    checkpoint_split.main(
        ["--merge", "--ckpt_dir", str(tmp_path / "full"), "--save_path", str(tmp_path / "hf")]
    )
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    tp = load_tp_model(str(tmp_path / "full"), rank=0, world_size=1, device=torch.device("cpu"))
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    torch.testing.assert_close(hf(ids).logits, tp(ids), atol=1e-4, rtol=1e-4)

    results = solver_train.main(
        common
        + ["--save_dir", str(tmp_path / "lora"), "--lora_rank", "4", "--lr", "1e-2", "--max_steps", "3"]
    )
    adapter = tmp_path / "lora/adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    from safetensors.torch import load_file

    lora = load_file(str(adapter / "adapter.00.safetensors"))
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in lora.items())  # B moved off zero
    base = torch.load(tmp_path / "full/consolidated.00.pth", weights_only=True)  # another model: sanity only
    merged = torch.load(tmp_path / "lora/consolidated.00.pth", weights_only=True)
    assert set(merged) == set(base) and not any(".lora_" in k for k in merged)
    original = load_tp_model(str(tiny_llama), rank=0, world_size=1, device=torch.device("cpu")).state_dict()
    assert not torch.equal(merged["layers.0.attention.wq.weight"], original["layers.0.attention.wq.weight"])
    assert torch.equal(
        merged["tok_embeddings.weight"], original["tok_embeddings.weight"]
    )  # frozen, no adapter


def test_verifier_rows_from_gsm8k_and_from_samples(tmp_path):
    from rlhf.errors import DataError
    from rlhf.tp.verifier import perturb_final_answer, read_verifier_rows

    rng = random.Random(0)
    for answer in ("3+4=7\n#### 7", "half is 2.5\n#### 2.5", "#### 1,000"):
        wrong = perturb_final_answer(answer, rng)
        assert wrong.rsplit("####", 1)[0] == answer.rsplit("####", 1)[0]
        assert wrong.rsplit("####", 1)[1].strip().replace(",", "") != answer.rsplit("####", 1)[1].strip()
    # no shortcut but the value: small labels get no negative wrong answers, separators are kept
    wrong = [
        perturb_final_answer(f"#### {n}", rng).split("#### ")[1] for n in (0, 1, 2, 3) for _ in range(20)
    ]
    assert min(int(w) for w in wrong) >= 0
    assert all(re.fullmatch(r"\d,\d{3}", perturb_final_answer("#### 5,000", rng)[5:]) for _ in range(20))
    write_jsonl(tmp_path / "a.jsonl", addition_rows(2))
    write_jsonl(tmp_path / "b.jsonl", [{"question": "q", "output": " #### 4", "correct": True}])
    rows = read_verifier_rows(str(tmp_path))
    assert [r["correct"] for r in rows] == [True, False, True, False, True]
    assert rows[0]["group"] == rows[1]["group"] != rows[2]["group"]
    write_jsonl(tmp_path / "c.jsonl", [{"question": "q", "output": "x", "correct": "yes"}])
    with pytest.raises(DataError, match='c.jsonl:1: "output" must be a string'):
        read_verifier_rows(str(tmp_path))


def test_verifier_held_out_split_keeps_each_question_on_one_side(tmp_path):
    """--eval_ratio holds out questions, not file lines: a one-line .json list (every row at file:1) gets
    its held-out share, and the samples of one question never land on both sides."""
    from rlhf.tp.verifier import read_verifier_rows, split_by_question

    rows = addition_rows(40, seed=1)
    (tmp_path / "list.json").write_text(json.dumps(rows))  # one line
    write_jsonl(tmp_path / "lines.jsonl", rows)
    n_questions = len({r["question"] for r in rows})
    for name in ("list.json", "lines.jsonl"):
        train, held = split_by_question(read_verifier_rows(str(tmp_path / name)), 0.25, seed=42)
        held_questions = {r["question"] for r in held}
        assert len(held_questions) == round(0.25 * n_questions), name
        assert not held_questions & {r["question"] for r in train}, name
        assert sum(r["correct"] for r in held) * 2 == len(held)  # each question's positive and negative
    samples = [
        {"question": r["question"], "output": f"sample {k} #### {k}", "correct": k == 0}
        for r in rows[:12]
        for k in range(4)
    ]
    (tmp_path / "samples").mkdir()
    write_jsonl(tmp_path / "samples" / "predictions.jsonl", samples)
    train, held = split_by_question(read_verifier_rows(str(tmp_path / "samples")), 0.25, seed=42)
    assert held and not {r["question"] for r in held} & {r["question"] for r in train}
    assert len(held) % 4 == 0  # all four samples of a held-out question


@pytest.mark.slow
def test_workflow_at_tp2_under_torchrun(tiny_llama, tmp_path):
    """One torchrun launch (2 processes, gloo) trains a LoRA solver, a verifier from it, evaluates best-of-N,
    runs PPO with verifier + gsm8k reward, and evaluates the PPO actor; then the dirs merge back and the
    merged solver reproduces the TP=2 greedy outputs at TP=1."""
    from transformers import AutoModelForCausalLM

    import checkpoint_split
    from rlhf.tp import solver_evaluate

    write_jsonl(tmp_path / "train.jsonl", addition_rows(8))
    env = script_env()
    command = torchrun(2)
    command += [str(GLOO_THREADS_AFTER), __file__, str(tiny_llama), str(tmp_path)]
    result = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    assert freed_process_groups(result.stderr, 2), result.stderr[-4000:]  # no group left to the exit

    for name in ("solver", "verifier", "actor", "critic"):
        params = json.loads((tmp_path / name / "params.json").read_text())
        assert params["n_shards"] == 2 and params["head"] == (
            "scalar" if name in ("verifier", "critic") else "lm"
        )
    assert sorted(p.name for p in (tmp_path / "solver/adapter").iterdir()) == [
        "adapter.00.safetensors", "adapter.01.safetensors", "adapter_config.json",
    ]  # fmt: skip
    verifier = json.loads((tmp_path / "verifier/training/results.json").read_text())
    assert "eval_accuracy" in verifier and verifier["tensor_parallel"] == 2  # its learning: test_tp_best_of_n

    samples, metrics = read_predictions(tmp_path / "bon")
    assert metrics["accuracy"] == sum(p["correct"] for p in samples) / len(samples)
    assert {"greedy_accuracy", "majority_vote_accuracy", "best_of_n_accuracy"} <= set(metrics)
    assert all(isinstance(p["verifier_score"], float) for p in samples)
    greedy, _ = read_predictions(tmp_path / "bon", "greedy_predictions.jsonl")
    assert metrics["greedy_accuracy"] == sum(p["correct"] for p in greedy) / len(greedy)

    lines = (tmp_path / "actor/training/metrics.jsonl").read_text().splitlines()
    first, last = json.loads(lines[0]), json.loads(lines[-1])  # one rollout (4 samples) feeds 2 steps
    assert last["step"] == 2 and {"reward/score", "objective/kl", "loss/policy", "loss/value"} <= set(first)
    actor_eval, actor_metrics = read_predictions(tmp_path / "actor_eval")
    assert actor_metrics["accuracy"] == sum(p["correct"] for p in actor_eval) / len(actor_eval)

    for name in ("solver", "actor"):
        checkpoint_split.main(
            ["--merge", "--ckpt_dir", str(tmp_path / name), "--save_path", str(tmp_path / f"{name}_hf")]
        )
        AutoModelForCausalLM.from_pretrained(tmp_path / f"{name}_hf")
    try:
        solver_evaluate.main(
            ["--ckpt_dir", str(tmp_path / "solver_hf"), "--label_file", str(tmp_path / "train.jsonl"),
             "--log_dir", str(tmp_path / "tp1"), "--max_gen_len", "8", "--max_batch_size", "4"]
        )  # fmt: skip
    finally:
        from rlhf.tp.distributed import shutdown

        shutdown()
    tp1, _ = read_predictions(tmp_path / "tp1")
    assert [p["output"] for p in tp1] == [p["output"] for p in greedy]


def worker(base: Path, root: Path) -> None:
    """torchrun entry: every command of the workflow in one process group (TP=2)."""
    from rlhf.tp import ppo_train, solver_evaluate, solver_train, verifier_train
    from rlhf.tp.distributed import init_model_parallel, shutdown

    init_model_parallel()  # one group for all commands (each leaves a group it did not create alone)

    data = str(root / "train.jsonl")
    train = ["--train_file", data, "--model_type", "llama", "--max_batch_size", "4", "--max_seq_len", "64"]
    solver_train.main(
        train
        + [
            "--ckpt_dir",
            str(base),
            "--save_dir",
            str(root / "solver"),
            "--lora_rank",
            "4",
            "--max_steps",
            "2",
        ]
    )
    verifier_train.main(
        train + ["--ckpt_dir", str(root / "solver"), "--save_dir", str(root / "verifier"), "--lora_rank", "-1",
                 "--max_steps", "2", "--eval_ratio", "0.25", "--lr", "1e-3"]
    )  # fmt: skip
    evaluate = ["--label_file", data, "--max_gen_len", "8", "--max_batch_size", "4"]
    solver_evaluate.main(
        evaluate + ["--ckpt_dir", str(root / "solver"), "--log_dir", str(root / "bon"), "--temperature", "1.0",
                    "--num_samples", "2", "--verifier_ckpt_dir", str(root / "verifier")]
    )  # fmt: skip
    ppo_train.main(
        ["--actor_ckpt_dir", str(root / "solver"), "--actor_save_dir", str(root / "actor"),
         "--critic_ckpt_dir", str(root / "verifier"), "--critic_save_dir", str(root / "critic"),
         "--reward_model_ckpt_dir", str(root / "verifier"), "--reward_fn", "gsm8k", "--train_file", data,
         "--model_type", "llama", "--max_batch_size", "2", "--max_buffer_size", "4", "--max_gen_len", "6",
         "--max_steps", "2", "--lora_rank", "4", "--logging_steps", "1"]
    )  # fmt: skip
    solver_evaluate.main(
        evaluate + ["--ckpt_dir", str(root / "actor"), "--log_dir", str(root / "actor_eval")]
    )
    shutdown()


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))


@pytest.mark.real_data
def test_real_gsm8k_rows_make_verifier_pairs():
    from rlhf.data.gsm8k import extract_gsm8k_label
    from rlhf.tp.verifier import read_verifier_rows

    path = REPO_ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    rows = read_verifier_rows(str(path))
    assert len(rows) % 2 == 0 and sum(r["correct"] for r in rows) == len(rows) // 2
    for good, bad in zip(rows[::2], rows[1::2]):
        assert extract_gsm8k_label(good["solution"]) != extract_gsm8k_label(bad["solution"])
