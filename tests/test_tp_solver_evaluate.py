"""solver_evaluate: scoring, stop strings, HF dirs with adapters, sampling, errors, and TP=2 under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from launch import script_env, torchrun

from rlhf.tp.prompt import gsm8k_prompt
from rlhf.tp.solver_evaluate import cut_at_stop, score

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_GSM8K = REPO_ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
    {"question": "A shop sells 1,000 pens a day. How many in 2 days?", "answer": "2*1000=2000\n#### 2,000"},
    {"question": "I love cats. How many legs do 2 cats have?", "answer": "2*4=8\n#### 8"},
]


def write_rows(path: Path, rows=ROWS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_outputs(log_dir: Path) -> tuple[list[dict], dict]:
    lines = (log_dir / "predictions.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], json.loads((log_dir / "metrics.json").read_text())


def hf_greedy(model_dir: Path, rows, max_new_tokens: int, adapter: Path | None = None) -> list[str]:
    """What transformers' generate continues each prompt with (decoded, special tokens skipped)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    outputs = []
    for row in rows:
        ids = tokenizer(gsm8k_prompt(row["question"]), return_tensors="pt")["input_ids"]
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
        outputs.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return outputs


def test_score_extracts_answers_from_tricky_strings():
    rows = [{"question": f"q{i}", "label": label} for i, label in enumerate(["1234", "5", "4.5", "7", "-3"])]
    outputs = [
        "so 1,000 + 234 = 1,234.\n#### 1,234",  # commas in the final answer
        "It costs $2 each, so the answer is $5.",  # "the answer is" wins over the last number? both 5
        "3 apples and 4.50 dollars",  # last number, trailing zero
        "#### seven, I think 7",  # no number after ####: falls back to the last number
        "The temperature is -3 degrees.",
    ]
    predictions, metrics = score(rows, outputs, [f"p{i}" for i in range(5)], num_samples=1)
    assert [p["prediction"] for p in predictions] == ["1234", "5", "4.5", "7", "-3"]
    assert all(p["correct"] for p in predictions)
    wrong, _ = score([{"question": "q", "label": "12"}], ["no digits here"], ["p"], 1)
    assert wrong[0]["prediction"] == "" and wrong[0]["correct"] is False
    assert metrics == {"accuracy": 1.0, "n": 5, "n_questions": 5}


def test_score_with_samples_reports_majority_vote():
    rows = [{"question": "q0", "label": "4"}, {"question": "q1", "label": "9"}]
    outputs = ["#### 4", "#### 5", "#### 4", "#### 1", "#### 2", "#### 9"]  # 3 samples per question
    predictions, metrics = score(rows, outputs, ["p0", "p1"], num_samples=3)
    assert [p["sample"] for p in predictions] == [0, 1, 2, 0, 1, 2]
    assert metrics["accuracy"] == pytest.approx(3 / 6) and metrics["n"] == 6
    assert metrics["majority_vote_accuracy"] == 0.5  # q0: 4 wins; q1: no majority for 9 (first seen, 1, wins)


def test_cut_at_stop():
    assert cut_at_stop("7\n#### 7\nQuestion: next", ["Question:", "\n\n"]) == "7\n#### 7\n"
    assert cut_at_stop("no stop", ["Question:"]) == "no stop"


@pytest.fixture
def world_of_one():
    from rlhf.tp.distributed import shutdown

    yield
    shutdown()


def test_hf_dir_with_adapter_and_sampling(tiny_model_factory, tmp_path, world_of_one):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf.tp.solver_evaluate import main

    base = tiny_model_factory("llama")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "down_proj"])
    )
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # a visible change of the greedy outputs
    model.save_pretrained(tmp_path / "adapter")
    data = write_rows(tmp_path / "test.jsonl")
    log = tmp_path / "log"
    common = ["--task", "GSM8K", "--label_file", str(data), "--max_gen_len", "12", "--max_batch_size", "2"]
    main(common + ["--ckpt_dir", str(base), "--peft_path", str(tmp_path / "adapter"), "--log_dir", str(log)])
    predictions, metrics = read_outputs(log)
    expected = hf_greedy(base, ROWS, 12, adapter=tmp_path / "adapter")
    assert [p["output"] for p in predictions] == expected
    assert expected != hf_greedy(base, ROWS, 12)  # the adapter matters
    assert [p["label"] for p in predictions] == ["7", "2000", "8"]
    assert metrics["n"] == 3 and metrics["accuracy"] == sum(p["correct"] for p in predictions) / 3

    sampled = tmp_path / "sampled"
    main(
        common
        + ["--ckpt_dir", str(base), "--log_dir", str(sampled), "--temperature", "1.0", "--num_samples", "2"]
    )
    predictions, metrics = read_outputs(sampled)
    assert len(predictions) == 6 and [p["sample"] for p in predictions[:2]] == [0, 1]
    assert "majority_vote_accuracy" in metrics
    assert len({p["output"] for p in predictions}) > 1


def test_generation_config_eos_ids_end_a_solution_as_in_transformers(
    tiny_model_factory, tmp_path, world_of_one
):
    """A chat model's end-of-turn id in generation_config.json (Llama-3's <|eot_id|>, Qwen2-Instruct's
    <|im_end|>) ends a solution, as Hugging Face generate ends it; the tokenizer's EOS alone used to."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.tp.loading import generation_eos_ids
    from rlhf.tp.solver_evaluate import main

    model_dir = tmp_path / "chat"
    shutil.copytree(tiny_model_factory("llama"), model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(gsm8k_prompt(ROWS[0]["question"]), return_tensors="pt")["input_ids"]
    greedy = AutoModelForCausalLM.from_pretrained(model_dir).generate(
        input_ids=ids, max_new_tokens=12, do_sample=False
    )
    end_of_turn = int(greedy[0, ids.shape[1] + 3])  # a token the greedy solution reaches: now an EOS id
    config = json.loads((model_dir / "generation_config.json").read_text())
    config["eos_token_id"] = [tokenizer.eos_token_id, end_of_turn]
    (model_dir / "generation_config.json").write_text(json.dumps(config))
    assert generation_eos_ids(str(model_dir)) == [tokenizer.eos_token_id, end_of_turn]
    log = tmp_path / "log"
    main(["--task", "GSM8K", "--label_file", str(write_rows(tmp_path / "t.jsonl")), "--max_gen_len", "12",
          "--max_batch_size", "2", "--ckpt_dir", str(model_dir), "--log_dir", str(log)])  # fmt: skip
    outputs = [p["output"] for p in read_outputs(log)[0]]
    assert outputs == hf_greedy(model_dir, ROWS, 12)
    plain = tokenizer.decode(greedy[0, ids.shape[1] :], skip_special_tokens=True)
    assert len(outputs[0]) < len(plain) and plain.startswith(outputs[0])


def test_an_adapter_dirs_eos_ids_are_its_bases(tiny_model_factory, tmp_path):
    """An SFT adapter dir as --ckpt_dir / --actor_ckpt_dir has no generation_config.json of its own: its base's
    EOS ids apply, as PEFT's model (run_ppo_with_peft.py) and the dirs saved from it have them."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf.tp.loading import generation_eos_ids

    base = tmp_path / "base"
    shutil.copytree(tiny_model_factory("llama"), base)
    config = json.loads((base / "generation_config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], 7]
    (base / "generation_config.json").write_text(json.dumps(config))
    adapter = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"])
    )
    adapter.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "generation_config.json").exists()
    assert (
        generation_eos_ids(str(tmp_path / "adapter"))
        == generation_eos_ids(str(base))
        == config["eos_token_id"]
    )


def test_a_damaged_generation_config_is_one_line_naming_it(tmp_path):
    from rlhf.errors import CheckpointError
    from rlhf.tp.loading import generation_eos_ids

    assert generation_eos_ids(str(tmp_path)) is None
    (tmp_path / "generation_config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="generation_config.json: not a generation config JSON object"):
        generation_eos_ids(str(tmp_path))


def test_user_errors_exit_2(tiny_model_factory, tmp_path, world_of_one, capsys):
    from rlhf.tp.solver_evaluate import main

    data = write_rows(tmp_path / "test.jsonl")
    base = [
        "--label_file",
        str(data),
        "--log_dir",
        str(tmp_path / "log"),
        "--ckpt_dir",
        str(tiny_model_factory()),
    ]
    cases = {
        "--num_samples > 1 needs --temperature": ["--num_samples", "3"],
        "--model_type qwen-7b expects a qwen checkpoint": ["--model_type", "qwen-7b"],
        "--model_type llama-2-7b has dim 4096": ["--model_type", "llama-2-7b"],
        "--task must be one of GSM8K": ["--task", "MATH"],
        "--temperature must be >= 0 (0 = greedy), got -1.0": ["--temperature", "-1"],
        "--top_p must be in (0, 1], got 1.5": ["--temperature", "1", "--top_p", "1.5"],
        "--generation_engine must be auto or static (the TP model has no Hugging Face generate), got 'hf'": [
            "--generation_engine",
            "hf",
        ],
    }
    for message, extra in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main(base + extra)
        assert exit_info.value.code == 2, extra
        assert message in capsys.readouterr().err


def test_limit_takes_the_first_n_questions_and_zero_or_negative_means_all(
    tiny_model_factory, tmp_path, world_of_one
):
    """--limit N > 0 evaluates the first N questions; 0 and -1 mean all of them (as --max_steps -1), not
    "all but the last" or "none" (a slice of the rows)."""
    from rlhf.tp.solver_evaluate import main

    data = write_rows(tmp_path / "test.jsonl")
    base = ["--label_file", str(data), "--ckpt_dir", str(tiny_model_factory()), "--max_gen_len", "2"]
    for limit, n in (("2", 2), ("0", 3), ("-1", 3)):
        metrics = main(base + ["--log_dir", str(tmp_path / f"log{limit}"), "--limit", limit])
        predictions, _ = read_outputs(tmp_path / f"log{limit}")
        assert metrics["n"] == len(predictions) == n, limit
        assert [p["question"] for p in predictions] == [r["question"] for r in ROWS[:n]]
        assert metrics["settings"]["limit"] == (2 if n == 2 else None)


def test_bad_outputs_and_damaged_checkpoints_fail_before_generating(
    tiny_model_factory, tmp_path, world_of_one, capsys, monkeypatch
):
    """A --log_dir that is a file, and a truncated or wrong verifier dir, are one line before any solving."""
    import shutil

    import checkpoint_split
    from rlhf.tp import solver_evaluate

    monkeypatch.setattr(solver_evaluate, "solve", lambda *a, **k: pytest.fail("generated before checking"))
    model = tiny_model_factory()
    checkpoint_split.main(["--ckpt_file", str(model), "--save_path", str(tmp_path / "lm"), "--n", "1"])
    (tmp_path / "file").write_text("")
    base = ["--label_file", str(write_rows(tmp_path / "test.jsonl")), "--ckpt_dir", str(model)]
    sample = ["--temperature", "1.0", "--num_samples", "2", "--log_dir", str(tmp_path / "log")]
    cases = {
        f"error: --log_dir {tmp_path / 'file'} is a file, not a directory": [
            "--log_dir",
            str(tmp_path / "file"),
        ],
        "(params.json head is not scalar)": sample + ["--verifier_ckpt_dir", str(tmp_path / "lm")],
        "a causal LM (no score head), not a verifier: pass the --save_dir of verifier_train": sample
        + ["--verifier_ckpt_dir", str(model)],
        # greedy: the one solution per question was generated twice and its "best of 1" reported
        "error: --verifier_ckpt_dir picks the best of several solutions per question: pass --temperature > 0 "
        "and --num_samples 2 or more (got 1)": [
            "--log_dir",
            str(tmp_path / "log"),
            "--verifier_ckpt_dir",
            str(model),
        ],
    }
    damaged = Path(shutil.copytree(tmp_path / "lm", tmp_path / "damaged"))
    shard = damaged / "consolidated.00.pth"
    shard.write_bytes(shard.read_bytes()[:1000])
    cases[f"error: {shard}: unreadable, truncated or corrupt"] = ["--ckpt_dir", str(damaged)] + sample
    for message, extra in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            solver_evaluate.main(base + extra)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "log").exists()


@pytest.mark.slow
def test_torchrun_tp2_on_shards_matches_transformers(tiny_model_factory, tmp_path):
    import checkpoint_split

    model_dir = tiny_model_factory("qwen2")
    checkpoint_split.main(
        ["--ckpt_file", str(model_dir), "--save_path", str(tmp_path / "shards"), "--n", "2"]
    )
    data = write_rows(tmp_path / "test.jsonl")
    command = torchrun(2)
    command += ["-m", "rlhf.tp.solver_evaluate", "--task", "GSM8K", "--ckpt_dir", str(tmp_path / "shards")]
    command += ["--log_dir", str(tmp_path / "log"), "--label_file", str(data), "--model_type", "qwen2"]
    command += ["--max_batch_size", "2", "--max_gen_len", "10", "--stop", "Question:"]
    env = script_env()
    result = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    predictions, metrics = read_outputs(tmp_path / "log")
    assert [p["question"] for p in predictions] == [r["question"] for r in ROWS]
    assert [p["prompt"] for p in predictions] == [gsm8k_prompt(r["question"]) for r in ROWS]
    assert [p["output"] for p in predictions] == [
        cut_at_stop(o, ["Question:"]) for o in hf_greedy(model_dir, ROWS, 10)
    ]
    assert metrics["tensor_parallel"] == 2 and metrics["n"] == 3
    assert metrics["accuracy"] == sum(p["correct"] for p in predictions) / 3


@pytest.mark.real_data
def test_real_gsm8k_rows(tiny_model_factory, tmp_path, world_of_one):
    if not SHARED_GSM8K.is_file():
        pytest.skip(f"{SHARED_GSM8K} is absent")
    from rlhf.tp.solver_evaluate import main

    metrics = main(
        ["--ckpt_dir", str(tiny_model_factory()), "--label_file", str(SHARED_GSM8K), "--limit", "3",
         "--log_dir", str(tmp_path / "log"), "--max_gen_len", "4"]
    )  # fmt: skip
    predictions, _ = read_outputs(tmp_path / "log")
    assert predictions[0]["label"] == "18" and metrics["n"] == 3


def test_an_interrupted_run_keeps_its_batches_and_the_same_command_finishes_it(
    tiny_model_factory, tmp_path, world_of_one, monkeypatch, capsys
):
    """3 questions x 2 samples in batches of 2: Ctrl-C during the third batch leaves two batches in the
    partial file; the same command generates only the third and writes what an uninterrupted run writes
    (each batch samples from its own seed); other settings start afresh."""
    from rlhf.generation.engine import EngineGenerator
    from rlhf.tp.solver_evaluate import main

    base = tiny_model_factory("llama")
    data = write_rows(tmp_path / "test.jsonl")

    def argv(log: Path, *extra: str) -> list[str]:
        return ["--task", "GSM8K", "--label_file", str(data), "--max_gen_len", "8", "--max_batch_size", "2",
                "--ckpt_dir", str(base), "--log_dir", str(log), "--temperature", "1.0", "--num_samples", "2",
                *extra]  # fmt: skip

    main(argv(tmp_path / "full"))
    expected, _ = read_outputs(tmp_path / "full")

    generate, calls = EngineGenerator.generate, []

    def counting(self, *args, interrupt_at: int | None = None, **kwargs):
        calls.append(1)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return generate(self, *args, **kwargs)

    log = tmp_path / "parts"
    monkeypatch.setattr(
        EngineGenerator, "generate", lambda self, *a, **k: counting(self, *a, interrupt_at=3, **k)
    )
    with pytest.raises(KeyboardInterrupt):
        main(argv(log))
    partial = log / ".solutions-samples.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 1 + 4  # the settings, then two batches of two
    assert not (log / "predictions.jsonl").exists()

    calls.clear()
    monkeypatch.setattr(EngineGenerator, "generate", lambda self, *a, **k: counting(self, *a, **k))
    metrics = main(argv(log))
    assert (
        len(calls) == 1 and "4 solutions from an earlier run of this command, kept" in capsys.readouterr().err
    )
    predictions, _ = read_outputs(log)
    assert predictions == expected and not partial.exists()
    assert metrics["questions_per_second"] > 0  # over the one question-batch generated now

    monkeypatch.setattr(
        EngineGenerator, "generate", lambda self, *a, **k: counting(self, *a, interrupt_at=2, **k)
    )
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        main(argv(log))
    calls.clear()
    monkeypatch.setattr(EngineGenerator, "generate", lambda self, *a, **k: counting(self, *a, **k))
    main(argv(log, "--seed", "1"))  # other settings: the kept batch is not theirs
    assert len(calls) == 3 and "was written with other settings" in capsys.readouterr().err


def test_solution_log_ignores_a_torn_last_line_and_seeds_batches_apart(tmp_path):
    from rlhf.data.files import files_signature
    from rlhf.tp.solution_log import SolutionLog, batch_seed

    log = SolutionLog(tmp_path / ".part.jsonl", {"seed": 0}, main=True)
    log.append({0: "a", 3: "b"})
    log.append({1: "c"})
    with (tmp_path / ".part.jsonl").open("a") as f:
        f.write('{"index": 2, "out')  # a kill while writing
    assert log.load() == {0: "a", 3: "b", 1: "c"}
    log.append({2: "d"})  # the torn line is gone: what is appended after it reads back
    assert log.load() == {0: "a", 3: "b", 1: "c", 2: "d"}
    assert SolutionLog(tmp_path / ".part.jsonl", {"seed": 1}, main=True).load() == {}  # other settings
    assert not (tmp_path / ".part.jsonl").exists()
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.pth").write_bytes(b"1234")
    before = files_signature(model)
    os.utime(model / "weights.pth", ns=(0, 10**9))  # the same size, written again
    assert files_signature(model) != before and files_signature(tmp_path / "absent") == []
    seeds = {batch_seed(s, b) for s in range(3) for b in range(100)}
    assert len(seeds) == 300 and all(0 <= x < 2**63 for x in seeds)
