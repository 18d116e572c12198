"""ppo_train's TP pieces at TP=1 in this process: the rollout engine as the generator, the gsm8k rule
reward, the critic starting as the verifier (shared LoRA base or separate models), and a bit-exact resume
through the per-rank checkpoint layout with the pretraining mix and wandb on. The TP=2 run is part of
tests/test_tp_train.py's torchrun workflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT

from rlhf.ppo.batch import SequenceBatch, left_pad

ROWS = [
    {"question": "What is 2 plus 2?", "answer": "2+2=4\n#### 4"},
    {"question": "What is 3 plus 5?", "answer": "3+5=8\n#### 8"},
    {"question": "What is 1 plus 6?", "answer": "1+6=7\n#### 7"},
    {"question": "What is 4 plus 4?", "answer": "4+4=8\n#### 8"},
]


@pytest.fixture
def verifier_dir(tiny_llama, tmp_path_factory):
    """A verifier shard dir (TP=1) with a non-zero head, trained for one step."""
    from rlhf.tp import verifier_train
    from rlhf.tp.distributed import shutdown

    root = tmp_path_factory.mktemp("verifier")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    verifier_train.main(
        ["--ckpt_dir", str(tiny_llama), "--save_dir", str(root / "v"), "--train_file", str(root / "train.jsonl"),
         "--max_steps", "1", "--lr", "1e-2", "--eval_ratio", "0"]
    )  # fmt: skip
    shutdown()
    return root


def test_tp_ppo_imports_no_peft_accelerate_or_hf_generation_code():
    """The TP PPO is assembled from the backend-neutral session and its own factory only."""
    import subprocess
    import sys

    code = (
        "import sys, rlhf.tp.ppo_train; print(sorted(m for m in sys.modules if m.startswith(("
        "'rlhf.ppo.peft', 'rlhf.backend.accelerate', 'rlhf.generation.hf'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    # the last line: transformers prints "[INFO] Running in WANDB offline mode" on import under WANDB_MODE=offline
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_tp_backend_step_clips_the_groups_it_is_given(tiny_llama, world_of_one):
    """Each group's norm (and clipping) is its own, as torch computes it at TP=1; a model the backend was
    not given in prepare() is refused (its split parameters would be counted wrongly at TP > 1)."""
    from rlhf.tp.backend import TPBackend
    from rlhf.tp.loading import load_tp_model

    backend = TPBackend(0)
    model = backend.prepare(load_tp_model(str(tiny_llama), rank=0, world_size=1, device=torch.device("cpu")))
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    model(ids).float().logsumexp(-1).sum().backward()
    params = [p for p in model.parameters() if p.grad is not None]
    groups = {"first": params[:3], "rest": params[3:]}
    expected = {k: float(torch.nn.utils.get_total_norm([p.grad for p in g])) for k, g in groups.items()}
    before = {k: [p.detach().clone() for p in g] for k, g in groups.items()}
    optimizers = {k: torch.optim.SGD(g, lr=1.0) for k, g in groups.items()}
    schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, lambda _: 1.0) for k, o in optimizers.items()}
    norms = backend.step(optimizers, schedulers, groups, max_norm=0.5)
    assert norms == pytest.approx(expected, rel=1e-5) and expected["first"] != pytest.approx(expected["rest"])
    for name, group in groups.items():  # SGD at lr 1 moved each group by its clipped gradient
        moved = torch.nn.utils.get_total_norm([p.detach() - b for p, b in zip(group, before[name])])
        assert float(moved) == pytest.approx(min(expected[name], 0.5), rel=1e-4)
    assert all(p.grad is None for p in params)  # zeroed after the step
    stranger = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="prepare"):
        backend.step({}, {}, {"x": list(stranger.parameters())}, 1.0)


def test_gsm8k_reward_matches_final_answers():
    from rlhf.tp.ppo_factory import gsm8k_reward

    reward = gsm8k_reward({"p1": "4", "p2": "1000"})
    assert reward(["p1", "p2", "p1"], [" 2+2=4\n#### 4", "so #### 1,000", "#### 5"]) == [1.0, 1.0, 0.0]


def test_rollout_generator_is_the_engine_on_the_tp_actor(tiny_llama, world_of_one):
    """ppo_train's generator (``--generation_engine auto``) is the rollout engine on the TP actor: its
    responses are HF generate's on the same weights, the EOS kept in the mask and nothing after it, and
    top-1 sampling is greedy; ``--generation_engine hf`` is one line naming the flag."""
    from contextlib import nullcontext

    from transformers import AutoModelForCausalLM

    from rlhf.errors import ConfigError
    from rlhf.generation import EngineGenerator, HFGenerator, SamplingConfig, build_generator
    from rlhf.models import load_tokenizer
    from rlhf.ppo.config import PPOArguments, PPOTrainingArguments
    from rlhf.ppo.session import rollout_generator
    from rlhf.tp.loading import load_tp_model

    tokenizer = load_tokenizer(str(tiny_llama), padding_side="left")
    model = load_tp_model(str(tiny_llama), rank=0, world_size=1, device=torch.device("cpu")).eval()
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompts = [tokenizer("Question: hi")["input_ids"], tokenizer("Question: a longer one")["input_ids"]]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    args = PPOTrainingArguments(output_dir="-", per_device_train_batch_size=2)

    def flags(**kw) -> PPOArguments:
        return PPOArguments(max_prompt_length=16, max_response_length=5, **kw)

    top1 = rollout_generator(flags(top_k=1), args, lambda: nullcontext(model), tokenizer)
    assert isinstance(top1, EngineGenerator)
    with pytest.raises(ConfigError, match="^--generation_engine hf: the tensor-parallel model"):
        rollout_generator(flags(generation_engine="hf"), args, lambda: nullcontext(model), tokenizer)
    for engine_flags in ({"generation_lora": "merged"}, {"generation_compile": True}):
        with pytest.raises(ConfigError, match=r"the static engine on a Hugging Face .*\(the tensor-parallel"):
            rollout_generator(flags(**engine_flags), args, lambda: nullcontext(model), tokenizer)
    greedy = SamplingConfig(max_new_tokens=5, temperature=0.0, pad_token_id=tokenizer.pad_token_id)
    eos = int(HFGenerator(lambda: nullcontext(hf), greedy).generate(ids, mask).response_ids[0, 2])
    greedy = SamplingConfig(5, temperature=0.0, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    out = build_generator("auto", lambda: nullcontext(model), greedy, max_prompt_length=16, max_batch_size=2)
    out = out.generate(ids, mask)
    expected = HFGenerator(lambda: nullcontext(hf), greedy).generate(ids, mask)
    assert torch.equal(out.response_ids, expected.response_ids)
    assert torch.equal(out.response_mask, expected.response_mask)
    torch.testing.assert_close(out.logprobs, expected.logprobs, atol=1e-5, rtol=1e-5)
    assert out.response_ids[0, 2] == eos and out.response_mask[0].tolist() == [1, 1, 1, 0, 0]
    assert (out.response_ids[0, 3:] == tokenizer.pad_token_id).all()
    sampled = top1.generate(ids, mask)  # top-1 sampling is greedy (the tokenizer's EOS: not generated)
    no_eos = SamplingConfig(5, temperature=0.0, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    assert torch.equal(
        sampled.response_ids, HFGenerator(lambda: nullcontext(hf), no_eos).generate(ids, mask).response_ids
    )


def test_ppo_train_rollouts_end_at_the_generation_config_eos_ids(
    tiny_llama, length_reward, gsm8k_file, tmp_path, world_of_one, monkeypatch
):
    """The actor dir's generation_config.json EOS ids (a chat model's end of turn) end a rollout, as they do
    in run_ppo_with_peft.py; the TP model keeps no generation_config of its own, so they were not read."""
    import shutil

    from test_ppo_estimator_runs import tp_argv

    from rlhf.tp import ppo_factory, ppo_train

    actor = tmp_path / "actor"
    shutil.copytree(tiny_llama, actor)
    config = json.loads((actor / "generation_config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], 7]
    (actor / "generation_config.json").write_text(json.dumps(config))
    built = []
    original = ppo_factory.rollout_generator
    monkeypatch.setattr(
        ppo_factory, "rollout_generator", lambda *a, **k: built.append(original(*a, **k)) or built[-1]
    )
    argv = tp_argv(actor, length_reward, gsm8k_file, tmp_path, "--advantage_estimator", "grpo",
                   "--num_samples_per_prompt", "2", "--max_steps", "1")  # fmt: skip
    ppo_train.main(argv)
    assert built[0].sampling.eos_token_id == (config["eos_token_id"][0], 7)


@pytest.mark.parametrize("lora_rank", [4, -1])
def test_critic_starts_as_the_verifier(tiny_llama, verifier_dir, world_of_one, lora_rank):
    """At step 0 the critic's score at the last token equals the reward; after a critic update the reward
    (frozen: a separate model, or the shared base with adapters off + the initial head) does not move."""
    from rlhf.models import load_tokenizer
    from rlhf.tp.ppo_factory import load_models
    from rlhf.tp.ppo_train import TPPPOArguments

    v = str(verifier_dir / "v")
    tp = TPPPOArguments(actor_ckpt_dir=str(tiny_llama), actor_save_dir="-", critic_ckpt_dir=v, critic_save_dir="-",
                        train_file="-", reward_model_ckpt_dir=v, lora_rank=lora_rank)  # fmt: skip
    models = load_models(tp, tp.lora_spec(), 0, 1, torch.device("cpu"))
    assert (models.reward is None) == (lora_rank > 0) and (models.reference is None) == (lora_rank > 0)
    tokenizer = load_tokenizer(str(tiny_llama), padding_side="left")
    prompts = [tokenizer("Question: " + r["question"] + "\nAnswer:")["input_ids"] for r in ROWS[:2]]
    ids, mask = left_pad(prompts, 0)
    response = torch.tensor([[40, 41, 2, 0], [42, 43, 44, 2]])
    batch = SequenceBatch(
        torch.cat([ids, response], 1),
        torch.cat([mask, torch.tensor([[1, 1, 1, 0], [1] * 4])], 1),
        ids.shape[1],
    )
    rows = torch.arange(2)
    reward = models.reward_scores(batch)
    critic = models.critic(batch.input_ids, batch.attention_mask)[rows, batch.last_token_positions]
    torch.testing.assert_close(critic, reward)
    assert reward.abs().sum() > 0  # the verifier's head is not the zero init
    optimizer = torch.optim.SGD(models.parameter_groups()["critic"], lr=1.0)
    models.values(batch).sum().backward()
    optimizer.step()
    assert not torch.allclose(
        models.critic(batch.input_ids, batch.attention_mask)[rows, batch.last_token_positions], reward
    )
    torch.testing.assert_close(models.reward_scores(batch), reward)
    ref = models.reference_logprobs(batch, 1.0)
    actor, _ = models.policy_logprobs(batch, 1.0)
    torch.testing.assert_close(actor.detach(), ref)  # the actor starts as the reference


def test_resume_mid_rollout_is_bit_exact(tiny_llama, verifier_dir, tmp_path, world_of_one, monkeypatch):
    from rlhf.tp import ppo_train

    for key in ("WANDB_DIR", "WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")

    common = ["--actor_ckpt_dir", str(tiny_llama), "--critic_ckpt_dir", str(verifier_dir / "v"),
              "--reward_model_ckpt_dir", str(verifier_dir / "v"), "--reward_fn", "gsm8k",
              "--train_file", str(verifier_dir / "train.jsonl"), "--max_batch_size", "2", "--max_buffer_size", "4",
              "--max_gen_len", "5", "--max_steps", "3", "--lora_rank", "4", "--logging_steps", "1",
              "--save_steps", "1", "--actor_lr", "1e-2", "--critic_lr", "1e-2", "--top_k", "8",
              "--pretrain_dataset_dir", str(REPO_ROOT / "pt_data"), "--block_size", "16",
              "--pretrain_warmup_steps", "2", "--lora_dropout", "0.1"]  # fmt: skip
    full = ppo_train.main(
        common + ["--actor_save_dir", str(tmp_path / "a"), "--critic_save_dir", str(tmp_path / "c"),
                  "--report_to", "wandb"]
    )  # fmt: skip
    checkpoint = tmp_path / "a_run" / "checkpoint-1"
    assert (checkpoint / "rank_0" / "trainable.safetensors").is_file()  # per-rank weights under TP
    assert (checkpoint / "rank_0" / "buffer.safetensors").is_file()  # step 1 ends inside a rollout
    resumed = ppo_train.main(
        common + ["--actor_save_dir", str(tmp_path / "a2"), "--critic_save_dir", str(tmp_path / "c2"),
                  "--resume_from_checkpoint", str(checkpoint)]
    )  # fmt: skip
    before = full.models.trainable_state()
    after = resumed.models.trainable_state()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    lines = [json.loads(x) for x in (tmp_path / "a_run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert all(r["loss/pretrain"] > 0 for r in lines)  # the PPO-ptx loss on pt_data blocks
    assert [r["loss/pretrain_weight"] for r in lines] == pytest.approx(
        [0.0, 0.05, 0.1]
    )  # warmed up over 2 steps
    assert list((tmp_path / "a_run" / "wandb").glob("offline-run-*/run-*.wandb")), (
        "--report_to wandb on rank 0"
    )
    assert json.loads((tmp_path / "a/params.json").read_text())["n_shards"] == 1
    assert Path(tmp_path / "a/training/metrics.jsonl").is_file()


def test_resuming_with_another_lora_alpha_is_refused(tiny_llama, tmp_path, world_of_one, capsys):
    """--lora_alpha scales the adapters without changing a tensor's shape: a resume with another one is one
    line naming the flag (as run_ppo_with_peft.py's --actor_lora_alpha), not a silently rescaled adapter."""
    from rlhf.tp import ppo_train

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    common = ["--actor_ckpt_dir", str(tiny_llama), "--actor_save_dir", str(tmp_path / "a"), "--reward_fn", "gsm8k",
              "--train_file", str(data), "--advantage_estimator", "grpo", "--num_samples_per_prompt", "2",
              "--max_batch_size", "2", "--max_buffer_size", "4", "--max_gen_len", "4", "--lora_rank", "4",
              "--save_steps", "1", "--report_to", "none"]  # fmt: skip
    first = ppo_train.main(common + ["--max_steps", "1", "--lora_alpha", "32"])
    assert first.models.adapter_settings() == {"lora_alpha": 32.0}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        ppo_train.main(common + ["--max_steps", "2", "--lora_alpha", "16"])
    err = capsys.readouterr().err
    checkpoint = tmp_path / "a_run" / "checkpoint-1"
    expected = f"{checkpoint} was written by a run with other settings (--lora_alpha 32.0 there, 16.0 now)"
    assert exc.value.code == 2 and expected in err and "Traceback" not in err, err


def test_a_reward_model_dir_that_is_no_verifier_is_refused_before_loading(
    tiny_llama, verifier_dir, tmp_path, world_of_one, monkeypatch, capsys
):
    """--reward_model_ckpt_dir must hold a verifier: a solver shard dir or an HF causal LM would get a
    zero-initialised head (reward 0 for every rollout). One line naming the flag, before any model loads;
    the verifier_train dir and its merged HF dir pass."""
    import checkpoint_split
    from rlhf.tp import ppo_factory, ppo_train
    from rlhf.tp.verifier import check_verifier_dir

    checkpoint_split.main(
        ["--ckpt_file", str(tiny_llama), "--save_path", str(tmp_path / "solver"), "-n", "1"]
    )
    checkpoint_split.main(
        ["--merge", "--ckpt_dir", str(verifier_dir / "v"), "--save_path", str(tmp_path / "v_hf")]
    )
    monkeypatch.setattr(ppo_factory, "load_models", lambda *a, **k: pytest.fail("loaded a model first"))
    common = ["--actor_ckpt_dir", str(tiny_llama), "--actor_save_dir", str(tmp_path / "a"), "--train_file",
              str(verifier_dir / "train.jsonl"), "--advantage_estimator", "grpo", "--num_samples_per_prompt", "2",
              "--max_batch_size", "2", "--max_buffer_size", "4", "--max_gen_len", "4", "--max_steps", "1"]  # fmt: skip
    cases = {
        str(tmp_path / "solver"): "a solver (params.json head is not scalar), not a verifier",
        str(tiny_llama): "a causal LM (no score head), not a verifier",
        str(tmp_path / "missing"): "no such directory",
    }
    for path, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            ppo_train.main(common + ["--reward_model_ckpt_dir", path])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"error: --reward_model_ckpt_dir {path}: {message}" in err, err
        assert "Traceback" not in err
    for verifier in (verifier_dir / "v", tmp_path / "v_hf"):
        check_verifier_dir(str(verifier), 1, "--reward_model_ckpt_dir")


def test_loop_flags_that_would_stop_the_run_are_refused_up_front(tmp_path, monkeypatch, capsys):
    """--save_steps 0 or --logging_steps 0 divided by zero after the first optimizer step (before any
    checkpoint); these and the other loop flags run_ppo_with_peft.py checks are one line before loading."""
    from rlhf.tp import ppo_train

    monkeypatch.setattr(ppo_train, "build_tp_session", lambda *a, **k: pytest.fail("built a session first"))
    base = ["--actor_ckpt_dir", str(tmp_path), "--actor_save_dir", str(tmp_path / "a"), "--train_file",
            str(tmp_path), "--reward_fn", "gsm8k", "--advantage_estimator", "grpo", "--num_samples_per_prompt",
            "2", "--max_batch_size", "2"]  # fmt: skip
    cases = {
        "--save_steps must be a positive number, got 0": ["--save_steps", "0"],
        "--logging_steps must be a positive number, got 0": ["--logging_steps", "0"],
        "--max_batch_size must be a positive number, got 0": ["--max_batch_size", "0"],
        "--max_buffer_size (--rollout_batches) must be a positive number, got 0": ["--max_buffer_size", "0"],
        "--temperature must be > 0": ["--temperature", "0"],
        "--min_response_length must be <= --max_gen_len": [
            "--max_gen_len",
            "2",
            "--min_response_length",
            "3",
        ],
    }
    for message, extra in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            ppo_train.main(base + extra)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"error: {message}" in err, (extra, err)


def test_the_descriptions_ppo_command_runs_as_written(tiny_llama, verifier_dir, tmp_path, world_of_one, monkeypatch,
                                                       capsys):  # fmt: skip
    """``verifier_train`` with the PPO flags and no --train_file (the description's PPO command, paths
    changed; --max_steps and --max_gen_len only keep it short) runs PPO on dataset/GSM8K/train.json."""
    from rlhf.tp import verifier_train

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dataset" / "GSM8K").mkdir(parents=True)
    (tmp_path / "dataset" / "GSM8K" / "train.json").write_text(json.dumps(ROWS))
    session = verifier_train.main(
        ["--actor_ckpt_dir", str(tiny_llama), "--actor_save_dir", "actor", "--critic_ckpt_dir",
         str(verifier_dir / "v"), "--critic_save_dir", "critic", "--reward_model_ckpt_dir", str(verifier_dir / "v"),
         "--max_batch_size", "2", "--max_buffer_size", "4", "--max_steps", "1", "--max_gen_len", "4"]
    )  # fmt: skip
    assert "--actor_ckpt_dir is a PPO flag: running rlhf.tp.ppo_train" in capsys.readouterr().err
    assert len(session.prompts) == len(ROWS)
    assert (tmp_path / "actor" / "params.json").is_file() and (tmp_path / "critic" / "params.json").is_file()


def sft_tiny_tp_model(base: Path, rows: list[dict], out: Path) -> Path:
    """A short full-parameter SFT pass on the toy task's answers in the GSM8K prompt the TP trainers use
    (:func:`rlhf.tp.solver_train.solver_example`), so the random tiny model writes sentences after it."""
    from test_ppo_run import full_fine_tune

    from rlhf.models import load_tokenizer
    from rlhf.tp.solver_train import solver_example

    tokenizer = load_tokenizer(str(base))
    examples = [solver_example(r["question"], r["answer"], tokenizer, max_seq_len=256) for r in rows]
    return full_fine_tune(base, [(e.input_ids, e.labels) for e in examples], out, steps=150)


@pytest.mark.slow
def test_tp_ppo_learns_a_rule_reward(tiny_llama, tmp_path, world_of_one):
    """rlhf.tp.ppo_train at TP=1, critic-free (grpo, 4 responses per prompt), a fully trained actor, on the
    toy task's questions: 12 rollouts raise the positivity score clearly, as the PEFT backend's do
    (tests/test_ppo_estimator_runs.py): 0.94 -> 1.80 here; with --actor_lr 0, 0.81 -> 1.14."""
    from rlhf.tp import ppo_train

    alpaca = json.loads((REPO_ROOT / "sft_data" / "feelings_alpaca.json").read_text())
    rows = [{"question": r["instruction"], "answer": r["output"]} for r in alpaca]
    sft = sft_tiny_tp_model(tiny_llama, rows, tmp_path / "sft")
    train_file = tmp_path / "questions.jsonl"
    labelled = [r | {"answer": r["answer"] + "\n#### 0"} for r in rows]  # a GSM8K row's form (unused labels)
    train_file.write_text("".join(json.dumps(r) + "\n" for r in labelled))
    ppo_train.main([
        "--actor_ckpt_dir", str(sft), "--actor_save_dir", str(tmp_path / "actor"), "--train_file", str(train_file),
        "--reward_fn", "rlhf.toy_task:positivity_reward", "--advantage_estimator", "grpo",
        "--num_samples_per_prompt", "4", "--max_batch_size", "8", "--max_buffer_size", "32", "--max_gen_len", "16",
        "--ppo_epochs", "1", "--max_steps", "48", "--logging_steps", "4", "--save_steps", "1000",
        "--actor_lr", "5e-4", "--lora_rank", "-1", "--kl_penalty_beta", "0.02", "--seed", "1",
        "--disable_tqdm", "true",
    ])  # fmt: skip
    metrics = [
        json.loads(line) for line in (tmp_path / "actor_run" / "metrics.jsonl").read_text().splitlines()
    ]
    scores = [m["reward/score"] for m in metrics]  # one row per 4 steps, each a rollout
    first, last = sum(scores[:2]) / 2, sum(scores[-3:]) / 3
    # positivity_reward is in [-2, 2]; the SFT model answers about half positively, half negatively
    assert last > first + 0.6 and last > 1.5, scores


def test_sequences_beyond_the_models_positions_warn(tiny_llama, tmp_path, world_of_one, capsys, monkeypatch):
    """As run_ppo_with_peft.py: prompts + --max_gen_len past the tiny llama's 512 positions get SFT's warning
    line, once the model is loaded (the run is stopped there)."""
    from rlhf.tp import ppo_factory, ppo_train

    def stop(*args, **kwargs):
        raise SystemExit(0)

    monkeypatch.setattr(ppo_factory, "assemble_session", stop)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    argv = ["--actor_ckpt_dir", str(tiny_llama), "--actor_save_dir", str(tmp_path / "a"), "--reward_fn", "gsm8k",
            "--train_file", str(data), "--advantage_estimator", "grpo", "--num_samples_per_prompt", "2",
            "--max_batch_size", "2", "--max_buffer_size", "4", "--max_gen_len", "600", "--report_to", "none"]  # fmt: skip
    with pytest.raises(SystemExit):
        ppo_train.main(argv)
    err = capsys.readouterr().err
    assert (
        "(--max_prompt_length + --max_gen_len " in err
        and "more than the model's max_position_embeddings 512" in err
    )
