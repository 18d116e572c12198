"""run_ppo_with_peft.py --do_eval: held-out prompts, greedy responses scored by the reward; the rows and
samples it writes; that it changes nothing in training; that it equals plain transformers + peft greedy
decoding of the saved actor; resume; flag errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from launch import script_env, torchrun
from peft import AutoPeftModelForCausalLM
from safetensors.torch import load_file
from test_ppo_estimator_runs import assert_fails_up_front, peft_argv
from test_ppo_run import one_thread  # noqa: F401 (autouse fixture)
from transformers import AutoTokenizer, GenerationConfig

import run_ppo_with_peft
from rlhf.errors import ConfigError, DataError
from rlhf.metrics import MetricsFile
from rlhf.ppo.batch import left_pad
from rlhf.ppo.data import PromptSet, hold_out_prompts, load_prompts

REPO = Path(__file__).resolve().parents[1]
EVAL_KEYS = {"step", "eval/score", "eval/score_std", "eval/response_length", "eval/eos_frac", "eval/prompts",
             "eval/seconds"}  # fmt: skip


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def split_rows_by_kind(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(training rows, eval rows) of a metrics.jsonl."""
    return [r for r in rows if "eval/score" not in r], [r for r in rows if "eval/score" in r]


def without_timings(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(("time/", "samples_per_s", "eval/seconds"))}


def eval_argv(model: Path, reward: str, out: Path, *extra: str) -> list[str]:
    return peft_argv(model, reward, out, "--do_eval", "--split_ratio", "0.1", *extra)


def test_hold_out_prompts_is_a_seeded_disjoint_split():
    prompts = PromptSet([[i] for i in range(50)], [f"p{i}" for i in range(50)], "--dataset_dir d")
    train, held = hold_out_prompts(prompts, 0.1, seed=3)
    assert len(held) == 5 and len(train) == 45
    assert sorted(train.texts + held.texts) == sorted(prompts.texts)
    assert [t[0] for t in held.ids] == [int(t[1:]) for t in held.texts]  # ids and texts stay paired
    assert hold_out_prompts(prompts, 0.1, seed=3)[1].texts == held.texts
    assert hold_out_prompts(prompts, 0.1, seed=4)[1].texts != held.texts
    assert "held out by --split_ratio" in held.source
    for ratio in (0.0, 1.0, -0.5):
        with pytest.raises(ConfigError, match="--split_ratio of the prompts: it must be in \\(0, 1\\)"):
            hold_out_prompts(prompts, ratio, seed=0)
    with pytest.raises(DataError, match="--do_eval needs at least 2 distinct prompts"):
        hold_out_prompts(PromptSet([[1], [1]], ["p", "p"]), 0.5, seed=0)


def test_a_repeated_prompt_is_held_out_whole_and_evaluated_once():
    """SFT data often repeats an instruction: split by row, a held-out prompt was also trained on."""
    texts = [f"p{i % 10}" for i in range(40)]  # 10 distinct prompts, 4 rows each
    prompts = PromptSet([[int(t[1:])] for t in texts], texts, "--dataset_dir d")
    train, held = hold_out_prompts(prompts, 0.2, seed=1)
    assert len(held) == 2 and len(set(held.texts)) == 2  # 20 % of the distinct prompts, once each
    assert not set(held.texts) & set(train.texts) and len(train) == 32
    assert [ids[0] for ids in held.ids] == [int(t[1:]) for t in held.texts]


def test_samples_file_keeps_text_and_writes_non_finite_numbers_as_null(tmp_path):
    file = MetricsFile(tmp_path / "eval_samples.jsonl")
    file.append_rows([{"step": 0, "response": "a\nb", "score": float("nan"), "ended": True, "length": 3}])
    file.append({"step": 1, "eval/score": float("inf")})
    assert read_rows(file.path) == [
        {"step": 0, "response": "a\nb", "score": None, "ended": True, "length": 3},
        {"step": 1, "eval/score": None},
    ]
    file.truncate_after(0)
    assert [r["step"] for r in read_rows(file.path)] == [0]


def test_eval_rows_samples_and_training_unchanged_by_evaluating(tiny_llama, length_reward, tmp_path):
    """Evaluating at every step or only at the start and the end: the same training rows and adapters
    (greedy decoding draws no random numbers), the same evaluations where both evaluate."""
    often, rarely = tmp_path / "often", tmp_path / "rarely"
    run_ppo_with_peft.main(eval_argv(tiny_llama, length_reward, often, "--eval_steps", "1"))
    run_ppo_with_peft.main(eval_argv(tiny_llama, length_reward, rarely, "--eval_steps", "100"))
    train_often, eval_often = split_rows_by_kind(read_rows(often / "metrics.jsonl"))
    train_rarely, eval_rarely = split_rows_by_kind(read_rows(rarely / "metrics.jsonl"))
    assert [without_timings(r) for r in train_often] == [without_timings(r) for r in train_rarely]
    assert [r["step"] for r in train_often] == [1, 2, 3]
    a, b = load_file(often / "adapter_model.safetensors"), load_file(rarely / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert [r["step"] for r in eval_often] == [0, 1, 2, 3] and [r["step"] for r in eval_rarely] == [0, 3]
    assert all(set(r) == EVAL_KEYS for r in eval_often)
    assert [without_timings(r) for r in (eval_often[0], eval_often[3])] == [
        without_timings(r) for r in eval_rarely
    ]
    held = eval_often[0]["eval/prompts"]
    prompts = load_prompts(str(REPO / "sft_data"), AutoTokenizer.from_pretrained(tiny_llama), 256, None)
    assert held == round(0.1 * len(set(prompts.texts)))  # of the distinct prompts
    samples = read_rows(often / "eval_samples.jsonl")
    assert len(samples) == 4 * held and [s["step"] for s in samples[::held]] == [0, 1, 2, 3]
    first = samples[:held]
    assert [s["index"] for s in first] == list(range(held))
    assert eval_often[0]["eval/score"] == pytest.approx(sum(s["score"] for s in first) / held)
    assert eval_often[0]["eval/response_length"] == pytest.approx(sum(s["length"] for s in first) / held)
    # the rule scores the decoded response, as in a rollout
    assert all(s["score"] == float(len(s["response"]) % 3) - 1.0 for s in samples)


def test_last_evaluation_equals_plain_greedy_decoding_of_the_saved_actor(tiny_llama, length_reward, tmp_path):
    """The final evaluation's responses and scores, recomputed with plain transformers + peft: the saved
    actor adapter on its base, Hugging Face greedy generate on the held-out prompts (the same split)."""
    out = tmp_path / "run"
    run_ppo_with_peft.main(eval_argv(tiny_llama, length_reward, out))
    samples = [s for s in read_rows(out / "eval_samples.jsonl") if s["step"] == 3]
    tokenizer = AutoTokenizer.from_pretrained(out)
    _, held = hold_out_prompts(load_prompts(str(REPO / "sft_data"), tokenizer, 256, None), 0.1, seed=7)
    assert [s["prompt"] for s in samples] == held.texts
    model = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=8,
        min_new_tokens=1,  # --min_response_length 1, the default: no empty response
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    responses = []
    for start in range(0, len(held), 4):  # the run's generation batch: --per_device_train_batch_size 4
        ids, mask = left_pad(held.ids[start : start + 4], tokenizer.pad_token_id)
        with torch.no_grad():
            sequences = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        responses += tokenizer.batch_decode(sequences[:, ids.shape[1] :], skip_special_tokens=True)
    assert [s["response"] for s in samples] == responses
    last = [r for r in read_rows(out / "metrics.jsonl") if r["step"] == 3 and "eval/score" in r][0]
    assert last["eval/score"] == pytest.approx(
        sum(float(len(r) % 3) - 1.0 for r in responses) / len(responses)
    )


def test_evaluation_scored_by_the_reward_adapter(tiny_llama, length_reward, tmp_path):
    """The spec's reward: a LoRA reward adapter on the same base (scored in chunks of the forward batch)."""
    from test_ppo_models import build_rm_adapter

    rm = build_rm_adapter(tiny_llama, tmp_path / "rm")
    argv = eval_argv(tiny_llama, length_reward, tmp_path / "run", "--per_device_forward_batch_size", "3")
    argv[argv.index("--reward_fn") : argv.index("--reward_fn") + 2] = ["--reward_lora_path", str(rm)]
    run_ppo_with_peft.main(argv)
    evals = split_rows_by_kind(read_rows(tmp_path / "run" / "metrics.jsonl"))[1]
    samples = read_rows(tmp_path / "run" / "eval_samples.jsonl")
    assert [r["step"] for r in evals] == [0, 1, 2, 3]
    assert all(isinstance(s["score"], float) for s in samples) and len({s["score"] for s in samples}) > 1
    first = [s["score"] for s in samples if s["step"] == 0]
    assert evals[0]["eval/score"] == pytest.approx(sum(first) / len(first))


def test_a_reward_fn_gets_all_answers_of_an_evaluation_in_one_call(tiny_llama, tmp_path):
    """As a rollout's responses: a rule that looks at its whole batch sees every held-out answer."""
    rule = tmp_path / "batch_rule.py"
    rule.write_text("def score(prompts, responses):\n    return [float(len(responses))] * len(responses)\n")
    run_ppo_with_peft.main(eval_argv(tiny_llama, f"{rule}:score", tmp_path / "run", "--max_steps", "1"))
    evals = split_rows_by_kind(read_rows(tmp_path / "run" / "metrics.jsonl"))[1]
    assert evals[0]["eval/prompts"] > 4 and all(r["eval/score"] == r["eval/prompts"] for r in evals)


def test_resumed_run_evaluates_as_the_uninterrupted_one(tiny_llama, length_reward, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"

    def argv(out: Path) -> list[str]:
        args = eval_argv(tiny_llama, length_reward, out, "--eval_steps", "1")
        for flag, value in (("--max_steps", "4"), ("--save_steps", "2")):
            args[args.index(flag) + 1] = value
        return args

    run_ppo_with_peft.main(argv(full))
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(full / "metrics.jsonl", resumed / "metrics.jsonl")
    shutil.copy(full / "eval_samples.jsonl", resumed / "eval_samples.jsonl")
    with (resumed / "eval_samples.jsonl").open("a") as f:  # a row the killed run wrote after its checkpoint
        f.write(json.dumps({"step": 3, "index": 0, "response": "lost"}) + "\n")
    run_ppo_with_peft.main(argv(resumed))
    for name in ("metrics.jsonl", "eval_samples.jsonl"):
        rows_full, rows_resumed = read_rows(full / name), read_rows(resumed / name)
        assert [without_timings(r) for r in rows_full] == [without_timings(r) for r in rows_resumed], name
    assert [r["step"] for r in split_rows_by_kind(read_rows(resumed / "metrics.jsonl"))[1]] == [0, 1, 2, 3, 4]


def test_two_processes_split_the_prompts_and_gather_every_sample(tiny_llama, length_reward, tmp_path):
    """torchrun, 2 processes (gloo): 9 held-out prompts (of 173 distinct), 5 and 4 per process (2 and 1
    generation batches);
    the samples of both, in held-out order, and at step 0 (the SFT policy, before any update) the same
    responses and scores as one process gives."""

    def argv(out: Path) -> list[str]:
        args = eval_argv(tiny_llama, length_reward, out, "--eval_steps", "100")
        args[args.index("--split_ratio") + 1] = str(9 / 173)
        args[args.index("--max_steps") + 1] = "1"
        return args

    proc = subprocess.run(
        [*torchrun(2), "run_ppo_with_peft.py", *argv(tmp_path / "two")], cwd=REPO, env=script_env(),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_ppo_with_peft.main(argv(tmp_path / "one"))
    two, one = (read_rows(tmp_path / d / "eval_samples.jsonl") for d in ("two", "one"))
    assert [(s["step"], s["index"]) for s in two] == [(0, i) for i in range(9)] + [(1, i) for i in range(9)]
    assert [without_timings(s) for s in two if s["step"] == 0] == [
        without_timings(s) for s in one if s["step"] == 0
    ]
    evals = split_rows_by_kind(read_rows(tmp_path / "two" / "metrics.jsonl"))[1]
    assert [r["eval/prompts"] for r in evals] == [9, 9]


def test_a_stop_at_an_evaluation_step_saves_at_once_and_the_resumed_run_evaluates(
    tiny_llama, length_reward, tmp_path, monkeypatch
):
    """SIGTERM agreed at step 2, an evaluation step: the checkpoint is saved without evaluating first (the
    grace period covers the rest of a step and the save, not an evaluation); the re-run makes the
    evaluation up, and the files read as the uninterrupted run's."""
    import signal

    from rlhf.interruption import StopSignals

    full, stopped = tmp_path / "full", tmp_path / "stopped"

    def argv(out: Path) -> list[str]:
        args = eval_argv(tiny_llama, length_reward, out, "--eval_steps", "2")
        args[args.index("--max_steps") + 1] = "4"
        return args

    run_ppo_with_peft.main(argv(full))
    calls = []  # agreed() after the step-0 evaluation, after step 1, after step 2

    def agreed(self, device) -> int:
        calls.append(device)
        return int(signal.SIGTERM) if len(calls) == 3 else 0

    with monkeypatch.context() as patch:
        patch.setattr(StopSignals, "agreed", agreed)
        with pytest.raises(SystemExit) as exc:
            run_ppo_with_peft.main(argv(stopped))
    assert exc.value.code == 128 + signal.SIGTERM and (stopped / "checkpoint-2").is_dir()
    assert [r["step"] for r in split_rows_by_kind(read_rows(stopped / "metrics.jsonl"))[1]] == [0]
    run_ppo_with_peft.main(argv(stopped))  # resumes from checkpoint-2, evaluates step 2 first
    for name in ("metrics.jsonl", "eval_samples.jsonl"):
        rows_full, rows_stopped = read_rows(full / name), read_rows(stopped / name)
        assert [without_timings(r) for r in rows_full] == [without_timings(r) for r in rows_stopped], name


def test_a_resume_with_nothing_left_to_train_still_evaluates_at_the_end(tiny_llama, length_reward, tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    args = eval_argv(tiny_llama, length_reward, first, "--eval_steps", "3")
    args[args.index("--max_steps") + 1], args[args.index("--save_steps") + 1] = "4", "2"
    run_ppo_with_peft.main(args)
    assert [r["step"] for r in split_rows_by_kind(read_rows(first / "metrics.jsonl"))[1]] == [0, 3, 4]
    again.mkdir()
    shutil.copytree(first / "checkpoint-2", again / "checkpoint-2")
    for name in ("metrics.jsonl", "eval_samples.jsonl"):
        shutil.copy(first / name, again / name)
    args[args.index("--output_dir") + 1], args[args.index("--max_steps") + 1] = str(again), "2"
    run_ppo_with_peft.main(args)  # step 2 reached: nothing to train, the final model saved and evaluated
    assert [r["step"] for r in split_rows_by_kind(read_rows(again / "metrics.jsonl"))[1]] == [0, 2]


def test_a_resume_that_adds_do_eval_is_refused(tiny_llama, length_reward, tmp_path, capsys):
    out = tmp_path / "run"
    args = peft_argv(tiny_llama, length_reward, out)
    args[args.index("--max_steps") + 1], args[args.index("--save_steps") + 1] = "2", "1"
    run_ppo_with_peft.main(args)
    shutil.rmtree(out / "checkpoint-2")
    with pytest.raises(SystemExit):
        run_ppo_with_peft.main([*args, "--do_eval", "--split_ratio", "0.1"])
    err = capsys.readouterr().err
    assert "number of prompts held out by --do_eval 0 there" in err and "--overwrite_output_dir" in err, err


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--do_eval", "--split_ratio", "0"], "--do_eval holds out --split_ratio of the prompts: it must be in (0, 1), got 0"),
     (["--eval_steps", "0"], "--eval_steps must be > 0, got 0")],
)  # fmt: skip
def test_eval_flags_fail_up_front(flags, message, tmp_path, capsys):
    assert_fails_up_front(flags, message, tmp_path, capsys)


def test_tensor_parallel_ppo_evaluates_held_out_questions_as_solver_evaluate_answers_them(
    tiny_llama, gsm8k_file, tmp_path, world_of_one
):
    """rlhf.tp.ppo_train --do_eval: a held-out GSM8K question answered greedily by the TP engine, scored by the
    gsm8k rule; the last answer is the one solver_evaluate gives with the saved actor."""
    from test_ppo_estimator_runs import tp_argv

    from rlhf.tp import ppo_train, solver_evaluate

    argv = tp_argv(tiny_llama, "gsm8k", gsm8k_file, tmp_path, "--advantage_estimator", "grpo",
                   "--num_samples_per_prompt", "2", "--max_steps", "2", "--do_eval", "--split_ratio", "0.25")  # fmt: skip
    ppo_train.main(argv)
    run = tmp_path / "a_run"
    evals = split_rows_by_kind(read_rows(run / "metrics.jsonl"))[1]
    assert [r["step"] for r in evals] == [0, 1, 2] and all(r["eval/prompts"] == 1 for r in evals)
    samples = read_rows(run / "eval_samples.jsonl")
    assert len(samples) == 3 and all(s["score"] in (0.0, 1.0) for s in samples)
    rows = [json.loads(line) for line in gsm8k_file.read_text().splitlines()]
    held = [r for r in rows if samples[0]["prompt"].find(r["question"]) >= 0]
    assert len(held) == 1
    (tmp_path / "held.jsonl").write_text(json.dumps(held[0]) + "\n")
    solver_evaluate.main(["--task", "GSM8K", "--label_file", str(tmp_path / "held.jsonl"), "--max_gen_len", "6",
                          "--ckpt_dir", str(tmp_path / "a"), "--log_dir", str(tmp_path / "eval")])  # fmt: skip
    answer = json.loads((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()[0])["output"]
    assert answer.strip() and samples[-1]["response"] == answer
