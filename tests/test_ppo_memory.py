"""PPO memory features give the same numbers as the plain path: chunked log-probs, entropies and pretraining
loss through the models bundles, and gradient checkpointing of the actor and critic updates (PEFT LoRA,
PEFT full fine-tuning, the tensor-parallel model at world size 1 here and 2 under torchrun: this file is
also the ``torchrun --nproc_per_node 2`` worker)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import script_env, torchrun
from test_ppo_models import build_rm_adapter

import run_ppo_with_peft
from rlhf.models.lora import LoraSpec
from rlhf.ppo.batch import SequenceBatch
from rlhf.ppo.peft_models import build_peft_policy_models
from rlhf.ppo.stats import entropy_from_logits, logprobs_from_logits

TARGETS = ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]


def random_batch(
    vocab: int, seed: int = 0, rows: int = 3, prompt: int = 5, response: int = 7
) -> SequenceBatch:
    """Left-padded prompts and right-padded responses of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, prompt + response), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a shorter prompt
    mask[2, prompt + 4 :] = 0  # a shorter response
    return SequenceBatch(ids * mask, mask, prompt)


def lora_bundle(model_dir, rank: int = 4, dropout: float = 0.0):
    """Actor and critic LoRA on one base, with non-zero LoRA B so the adapters matter."""
    models = build_peft_policy_models(
        str(model_dir), actor=LoraSpec(rank, 8.0, dropout, TARGETS), critic=LoraSpec(rank, 8.0, dropout, TARGETS),
        reward_adapter=None, critic_init="sft",
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in models.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return models


@pytest.fixture(scope="module")
def bundle(tiny_llama):
    return lora_bundle(tiny_llama).eval()


def plain_logprobs(models, batch: SequenceBatch, temperature: float):
    """The unchunked reference: the actor's full-vocabulary logits from its own forward."""
    model, active = models._actor()
    with active:
        logits = models._response_logits(model, batch)
    return logprobs_from_logits(logits, batch.response_ids, temperature), entropy_from_logits(
        logits, temperature
    )


@pytest.mark.parametrize("positions", [1, 3, 7, 64])  # 3 does not divide the 7 response positions
def test_bundle_logprobs_and_entropy_equal_full_logits(bundle, positions):
    vocab = bundle.lm.config.vocab_size
    batch = random_batch(vocab)
    default = bundle.logits_chunk_bytes
    bundle.logits_chunk_bytes = positions * 4 * vocab * batch.input_ids.shape[0]  # `positions` per chunk
    try:
        lp, ent = bundle.policy_logprobs(batch, 0.7, with_entropy=True)
        ref_lp, ref_ent = plain_logprobs(bundle, batch, 0.7)
        torch.testing.assert_close(lp, ref_lp, atol=1e-6, rtol=0)
        torch.testing.assert_close(ent, ref_ent, atol=1e-6, rtol=1e-6)  # entropies ~6: float32 ulp 5e-7

        # gradients of the actor's LoRA weights agree too
        params = bundle.parameter_groups()["actor"]
        grads = torch.autograd.grad((lp * batch.response_mask).sum() + ent.sum(), params)
        ref = torch.autograd.grad((ref_lp * batch.response_mask).sum() + ref_ent.sum(), params)
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)

        with torch.no_grad(), bundle._adapter(None):
            logits = bundle._response_logits(bundle.lm, batch)
        expected = logprobs_from_logits(logits, batch.response_ids, 0.7)
        torch.testing.assert_close(bundle.reference_logprobs(batch, 0.7), expected, atol=1e-6, rtol=0)
    finally:
        bundle.logits_chunk_bytes = default


def test_pretrain_loss_equals_the_models_own_loss(bundle):
    ids = random_batch(bundle.lm.config.vocab_size, seed=3).input_ids.clamp(min=3)
    params = bundle.parameter_groups()["actor"]
    loss = bundle.pretrain_loss(ids)
    model, active = bundle._actor()
    with active:
        expected = model(input_ids=ids, labels=ids, use_cache=False).loss
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    for g, r in zip(torch.autograd.grad(loss, params), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)


def update_gradients(models, batch: SequenceBatch, seed: int = 0) -> dict[str, torch.Tensor]:
    """Gradients of an actor loss (policy log-probs, entropy, pretraining loss) and a critic loss, summed and
    taken in ONE backward (so a checkpointed layer is recomputed after another adapter was set)."""
    models.train(True)
    torch.manual_seed(seed)
    for params in models.parameter_groups().values():
        for p in params:
            p.grad = None
    lp, ent = models.policy_logprobs(batch, 1.0, with_entropy=True)
    actor_loss = -(lp * batch.response_mask).mean() - 0.1 * ent.mean()
    actor_loss = actor_loss + 0.1 * models.pretrain_loss(batch.input_ids)
    critic_loss = ((models.values(batch) - 1.0) ** 2 * batch.response_mask).mean()
    (actor_loss + critic_loss).backward()
    models.train(False)
    return {
        f"{group}:{name}": p.grad.clone()
        for group, params in models._trainable.items()
        for name, p in params
        if p.grad is not None
    }


def assert_same_gradients(plain: dict, checkpointed: dict, atol: float = 1e-6) -> None:
    assert plain.keys() == checkpointed.keys()
    assert any(g.abs().sum() > 0 for k, g in plain.items() if k.startswith("actor"))
    assert any(g.abs().sum() > 0 for k, g in plain.items() if k.startswith("critic"))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=atol, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dropout", [0.0, 0.1])  # LoRA dropout: the recompute replays the same masks
def test_gradient_checkpointing_same_gradients_lora(tiny_llama, dropout):
    batch = random_batch(512, seed=4)
    models = lora_bundle(tiny_llama, dropout=dropout)
    plain = update_gradients(models, batch)
    models.enable_gradient_checkpointing()
    layers = models.lm.get_base_model().model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    checkpointed = update_gradients(models, batch)
    assert_same_gradients(plain, checkpointed)


def test_gradient_checkpointing_recomputes_under_the_forward_adapter(tiny_llama):
    """A backward taken after another adapter was set still recomputes the layers under the adapter of the
    forward (without the recompute context the critic's LoRA would be used for the actor's layers)."""
    batch = random_batch(512, seed=5)
    models = lora_bundle(tiny_llama)
    models.train(True)
    params = models.parameter_groups()["actor"]
    lp, _ = models.policy_logprobs(batch, 1.0)
    expected = torch.autograd.grad(lp.sum(), params)
    models.enable_gradient_checkpointing()
    lp, _ = models.policy_logprobs(batch, 1.0)
    with models._adapter("critic"):
        assert models.lm.active_adapter == "critic"
        lp.sum().backward()
    grads = [p.grad for p in params]
    for g, r in zip(grads, expected):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)


def test_log_prob_chunks_recompute_an_adapted_head_under_the_forward_adapter(tiny_llama):
    """An actor with LoRA on ``lm_head``: the log-prob chunks are recomputed in the backward; after the
    critic's forward set its adapter, they must still recompute with the actor's (else the backward
    failed: a different number of tensors saved)."""
    batch = random_batch(512, seed=5)
    models = build_peft_policy_models(
        str(tiny_llama), actor=LoraSpec(8, 32, 0.0, ["q_proj", "v_proj", "lm_head"]),
        critic=LoraSpec(8, 32, 0.0, ["q_proj", "v_proj"]), reward_adapter=None, critic_init="sft",
    )  # fmt: skip
    with torch.no_grad():  # a non-zero head adapter, so the recompute's adapter shows in the gradients
        for name, param in models.lm.named_parameters():
            if "lm_head.lora_B.actor" in name:
                param.normal_(0, 0.5)
    models.train(True)
    params = [p for n, p in models.lm.named_parameters() if "lm_head.lora_" in n and ".actor" in n]
    lp, _ = models.policy_logprobs(batch, 1.0)
    expected = torch.autograd.grad(lp.sum(), params)
    lp, _ = models.policy_logprobs(batch, 1.0)
    values = models.values(batch)  # the critic's forward: its adapter is the active one now
    assert models.lm.active_adapter == "critic"
    got = torch.autograd.grad(lp.sum() + 0 * values.sum(), params)
    for g, r in zip(got, expected):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_same_gradients_full_fine_tuning(tiny_llama):
    batch = random_batch(512, seed=6)
    models = build_peft_policy_models(
        str(tiny_llama), actor=LoraSpec(-1, 0, 0, []), critic=LoraSpec(-1, 0, 0, []), reward_adapter=None,
        critic_init="sft",
    )  # fmt: skip
    plain = update_gradients(models, batch)
    models.enable_gradient_checkpointing()
    assert all(layer.gradient_checkpointing for layer in models.actor_full.model.layers)
    assert all(layer.gradient_checkpointing for layer in models.critic_full.model.layers)
    assert_same_gradients(plain, update_gradients(models, batch), atol=1e-5)
    assert models.actor_full.config.use_cache  # the saved config.json lets users' forwards cache


def test_only_training_forwards_with_gradients_checkpoint(tiny_llama):
    """The rollout's forwards (eval mode, no grad) run without checkpointing; the update's do."""
    batch = random_batch(512, seed=7)
    models = lora_bundle(tiny_llama)
    models.enable_gradient_checkpointing()
    calls = []
    for layer in models.lm.get_base_model().model.layers:
        inner = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, inner=inner, **k: calls.append(1) or inner(*a, **k)
    models.train(False)
    with torch.no_grad():
        models.reference_logprobs(batch, 1.0)
        models.policy_logprobs(batch, 1.0)
        models.values(batch)
    assert not calls
    models.train(True)
    models.values(batch).sum().backward()
    assert len(calls) == len(models.lm.get_base_model().model.layers)


def tp_bundle(model_dir, lora_rank: int, dropout: float = 0.0):
    """The TP bundle at world size 1: LoRA actor and critic (non-zero B), or fully trainable ones."""
    from rlhf.tp.loading import load_tp_model
    from rlhf.tp.lora import apply_lora, lora_layers
    from rlhf.tp.ppo_models import TPPolicyModels

    cpu = torch.device("cpu")
    actor = load_tp_model(str(model_dir), rank=0, world_size=1, device=cpu, dtype=torch.float32)
    critic = load_tp_model(
        str(model_dir), rank=0, world_size=1, device=cpu, dtype=torch.float32, scalar_head=True
    )
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        critic.v_head.weight.copy_(torch.randn(critic.v_head.weight.shape, generator=gen) * 0.1)
    if lora_rank > 0:
        for model in (actor, critic):
            apply_lora(model, r=lora_rank, alpha=8.0, dropout=dropout, targets=TARGETS)
            with torch.no_grad():
                for layer in lora_layers(model).values():
                    layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.05)
        critic.v_head.weight.requires_grad_(True)
    return TPPolicyModels(actor, critic, actor_source=str(model_dir), critic_source=str(model_dir))


@pytest.mark.parametrize("positions", [2, 64])  # 2 does not divide the 7 response positions
def test_tp_logprobs_entropy_and_pretrain_loss_equal_full_logits(tiny_llama, world_of_one, positions):
    models = tp_bundle(tiny_llama, lora_rank=4)
    batch = random_batch(512, seed=8)
    models.logits_chunk_bytes = positions * 4 * 512 * batch.input_ids.shape[0]
    lp, ent = models.policy_logprobs(batch, 0.7, with_entropy=True)
    hidden = models.actor.hidden_states(batch.input_ids, batch.attention_mask)
    logits = models.actor.logits(hidden[:, batch.prompt_len - 1 : -1])
    torch.testing.assert_close(lp, logprobs_from_logits(logits, batch.response_ids, 0.7), atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, entropy_from_logits(logits, 0.7), atol=1e-6, rtol=1e-6)

    ids = batch.input_ids.clamp(min=3)
    full = models.actor(ids)
    expected = torch.nn.functional.cross_entropy(
        full[:, :-1].reshape(-1, full.shape[-1]), ids[:, 1:].reshape(-1)
    )
    params = models.parameter_groups()["actor"]
    loss = models.pretrain_loss(ids)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    for g, r in zip(torch.autograd.grad(loss, params), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("lora_rank, dropout", [(4, 0.0), (4, 0.1), (-1, 0.0)])
def test_tp_gradient_checkpointing_same_gradients(tiny_llama, world_of_one, monkeypatch, lora_rank, dropout):
    import rlhf.tp.model as tp_model

    batch = random_batch(512, seed=9)
    models = tp_bundle(tiny_llama, lora_rank, dropout)
    plain = update_gradients(models, batch)
    models.enable_gradient_checkpointing()
    calls = []
    inner = tp_model.checkpoint
    monkeypatch.setattr(tp_model, "checkpoint", lambda *a, **k: calls.append(1) or inner(*a, **k))
    assert_same_gradients(plain, update_gradients(models, batch), atol=1e-5)
    # every block of the actor (policy log-probs, pretraining loss) and the critic, nothing in eval mode
    assert len(calls) == 3 * models.actor.args.n_layers
    models.train(False)
    models.policy_logprobs(batch, 1.0)
    assert len(calls) == 3 * models.actor.args.n_layers


def tp_outputs(models, batch: SequenceBatch) -> dict[str, torch.Tensor]:
    """Log-probs, entropies and pretraining loss (chunked, 2 positions per chunk) and the update's gradient
    of every replicated parameter (norms and value head: whole on every rank), plain and checkpointed."""
    models.logits_chunk_bytes = 2 * 4 * 512 * batch.input_ids.shape[0]
    with torch.no_grad():
        lp, ent = models.policy_logprobs(batch, 0.7, with_entropy=True)
        out = {"logprobs": lp, "entropy": ent, "pretrain": models.pretrain_loss(batch.input_ids.clamp(min=3))}
    for name, switch in (("plain", lambda: None), ("checkpointed", models.enable_gradient_checkpointing)):
        switch()
        grads = update_gradients(models, batch)
        out |= {f"{name}:{key}": g for key, g in grads.items() if "norm" in key or "v_head" in key}
    return out


@pytest.mark.slow
def test_tp_world_size_2_equals_world_size_1(tiny_llama, world_of_one, tmp_path):
    """At TP=2 (vocabulary-split output layer gathered inside each checkpointed chunk, blocks recomputed with
    their all-reduces) the chunked log-probs, entropies, pretraining loss and the checkpointed gradients equal
    TP=1's."""
    command = torchrun(2) + [__file__, str(tiny_llama), str(tmp_path)]
    result = subprocess.run(command, env=script_env(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = tp_outputs(tp_bundle(tiny_llama, lora_rank=-1), random_batch(512, seed=10))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4, msg=key)


def worker(model_dir: Path, out: Path) -> None:
    """torchrun entry: the TP=2 outputs of :func:`tp_outputs`, one file per rank."""

    from rlhf.tp.distributed import init_model_parallel, shutdown
    from rlhf.tp.loading import load_tp_model
    from rlhf.tp.ppo_models import TPPolicyModels

    rank, world_size = init_model_parallel("gloo")
    cpu = torch.device("cpu")
    actor = load_tp_model(str(model_dir), rank=rank, world_size=world_size, device=cpu)
    critic = load_tp_model(str(model_dir), rank=rank, world_size=world_size, device=cpu, scalar_head=True)
    with torch.no_grad():
        critic.v_head.weight.copy_(
            torch.randn(critic.v_head.weight.shape, generator=torch.Generator().manual_seed(2)) * 0.1
        )
    models = TPPolicyModels(actor, critic, actor_source=str(model_dir), critic_source=str(model_dir))
    torch.save(tp_outputs(models, random_batch(512, seed=10)), out / f"rank{rank}.pt")
    shutdown()  # barrier, then free the groups before exit (see rlhf.tp.distributed)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))


# -- the rollout's forwards in row chunks, and the flags end to end ----------------------------------------


class CountingScorer:
    """A model-like scorer: one score per sequence from its tokens; remembers each call's row count."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def score(self, batch: SequenceBatch, prompts: list[str], responses: list[str]) -> torch.Tensor:
        assert len(prompts) == len(responses) == batch.input_ids.shape[0]
        self.calls.append(batch.input_ids.shape[0])
        return (batch.input_ids * batch.attention_mask).float().sum(1)


def test_score_in_chunks_chunks_model_scorers_only():
    from rlhf.ppo.memory import score_in_chunks
    from rlhf.ppo.rewards import RuleScorer, SumScorer

    batch = random_batch(512, seed=11, rows=3)
    texts = ["a", "bb", "ccc"]
    rule_calls = []
    rule = RuleScorer(lambda p, r: rule_calls.append(len(r)) or [float(len(x)) for x in r], "len")
    model = CountingScorer()
    scores = score_in_chunks(SumScorer([model, rule]), batch, texts, texts, rows=2)
    assert model.calls == [2, 1] and rule_calls == [3]  # a rule sees the whole rollout in one call
    expected = (batch.input_ids * batch.attention_mask).float().sum(1) + torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(scores, expected)


def test_forward_batch_size_defaults_to_the_mini_batch_and_rejects_zero():
    from rlhf.errors import ConfigError
    from rlhf.ppo.memory import forward_batch_size

    assert forward_batch_size(-1, 8) == 8 and forward_batch_size(3, 8) == 3
    with pytest.raises(ConfigError, match="--per_device_forward_batch_size"):
        forward_batch_size(0, 8)


def ppo_argv(model_dir: Path, rm: Path, out: Path, *extra: str) -> list[str]:
    repo = Path(__file__).resolve().parents[1]
    return [
        "--sft_model_path", str(model_dir), "--reward_lora_path", str(rm), "--dataset_dir", str(repo / "sft_data"),
        "--pretrain_dataset_dir", str(repo / "pt_data"), "--output_dir", str(out),
        "--per_device_train_batch_size", "4", "--per_device_mini_train_batch_size", "2", "--max_response_length", "8",
        "--max_steps", "2", "--logging_steps", "1", "--save_steps", "100", "--seed", "3", "--actor_lr", "1e-2",
        "--critic_lr", "1e-2", "--disable_tqdm", "true", "--pretrain_warmup_steps", "0", *extra,
    ]  # fmt: skip


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_a_process_started_by_a_large_one_reports_its_own_peak():
    """``ru_maxrss`` keeps the parent's peak across fork and exec: a PPO run (or a benchmark worker) started
    from a large process reported at least that process's memory as its own peak."""
    ballast = bytearray(1 << 30)
    ballast[:: 1 << 12] = b"\x01" * len(ballast[:: 1 << 12])  # touched: resident
    code = "from rlhf.ppo.memory import peak_rss_gb; print(peak_rss_gb())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=script_env(), check=True
    )
    child = float(out.stdout.split()[-1])
    assert 0.01 < child < 0.9, child  # torch imported (a few hundred MB), not the parent's gigabyte
    del ballast


def test_flags_leave_the_run_unchanged_and_the_peak_is_logged(tiny_llama, tmp_path, capsys):
    """--gradient_checkpointing (LoRA dropout on: the recompute replays its masks) and
    --per_device_forward_batch_size 1 (reward adapter, reference and critic forwards one row at a time) give the
    metrics of the plain run; the end of the first optimizer step logs the peak memory, once."""
    rm = build_rm_adapter(tiny_llama, tmp_path / "rm")
    torch.set_num_threads(1)  # one summation order for both runs
    run_ppo_with_peft.main(ppo_argv(tiny_llama, rm, tmp_path / "plain"))
    capsys.readouterr()
    lean = ["--gradient_checkpointing", "--per_device_forward_batch_size", "1"]
    run_ppo_with_peft.main(ppo_argv(tiny_llama, rm, tmp_path / "lean", *lean))
    log = capsys.readouterr().err
    assert "gradient checkpointing: every decoder layer" in log
    peak = [line for line in log.splitlines() if "peak memory" in line]
    assert len(peak) == 1 and "peak memory after optimizer step 1: " in peak[0] and "RSS" in peak[0]
    rows = {
        name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("plain", "lean")
    }
    assert len(rows["plain"]) == len(rows["lean"]) == 2
    for plain, lean in zip(rows["plain"], rows["lean"]):
        assert plain.keys() == lean.keys() and "memory/peak_gb" not in plain  # GPU only
        assert plain["loss/pretrain"] > 0 and plain["reward/score"] != 0
        for key, value in plain.items():
            if not key.startswith(("time/", "samples_per_s")):
                assert lean[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_forward_chunks_give_the_same_rollout(tiny_llama, tmp_path):
    """The rollout's reward-adapter, reference and critic forwards on 1 or 3 rows at a time (3 does not divide
    the 4 samples) give the default's (4 rows) scores, values, advantages and returns."""
    from rlhf.backend.accelerate import AccelerateBackend
    from rlhf.generation import HFGenerator
    from rlhf.models import load_tokenizer
    from rlhf.ppo.config import PPOArguments, PPOTrainingArguments
    from rlhf.ppo.data import PromptSet
    from rlhf.ppo.loop import TrainState, collect_rollout
    from rlhf.ppo.metrics import MetricsAccumulator
    from rlhf.ppo.peft_models import read_reward_adapter
    from rlhf.ppo.rewards import AdapterScorer
    from rlhf.ppo.session import SessionParts, assemble_session, sampling_config

    spec = LoraSpec(4, 8.0, 0.0, TARGETS)
    rm = read_reward_adapter(str(build_rm_adapter(tiny_llama, tmp_path / "rm")))
    models = build_peft_policy_models(
        str(tiny_llama), actor=spec, critic=spec, reward_adapter=rm, critic_init="reward"
    )
    tokenizer = load_tokenizer(str(tiny_llama), padding_side="left")
    texts = ["Tell me how you feel about cats.", "Hi", "What do you think of bread?", "Books?"]
    prompts = PromptSet([tokenizer(t)["input_ids"] for t in texts], texts)
    rollouts = {}
    for rows in (-1, 1, 3):
        ppo = PPOArguments(
            max_response_length=6, per_device_mini_train_batch_size=4, per_device_forward_batch_size=rows
        )
        args = PPOTrainingArguments(
            output_dir=str(tmp_path / f"out{rows}"), per_device_train_batch_size=4, seed=0
        )
        generator = HFGenerator(models.generation_model, sampling_config(ppo, tokenizer))
        parts = SessionParts(backend=AccelerateBackend(), models=models, scorer=AdapterScorer(models),
                             tokenizer=tokenizer, prompts=prompts, generator=generator)  # fmt: skip
        session = assemble_session(parts, ppo, args, {})
        metrics = MetricsAccumulator()
        torch.manual_seed(0)
        buffer = collect_rollout(session, TrainState(), metrics)
        rollouts[rows] = (buffer, metrics.state()["rollouts"][0]["stats"])  # reward/score, objective/kl, ...
    default, stats = rollouts[-1]
    assert default.old_values.abs().sum() > 0 and default.advantages.abs().sum() > 0
    for rows in (1, 3):
        buffer, chunked_stats = rollouts[rows]
        untimed = {k: v for k, v in stats.items() if not k.startswith("time/")}
        assert {k: v for k, v in chunked_stats.items() if not k.startswith("time/")} == pytest.approx(
            untimed, rel=1e-6, abs=1e-6
        )
        assert torch.equal(buffer.sequences.input_ids, default.sequences.input_ids)
        for key in ("old_logprobs", "old_values", "advantages", "returns"):
            torch.testing.assert_close(
                getattr(buffer, key), getattr(default, key), atol=1e-6, rtol=1e-6, msg=key
            )


@pytest.mark.gpu
def test_gpu_run_logs_and_records_the_peak(tiny_llama, tmp_path, capsys):
    """On a GPU (`pytest -m gpu tests/test_ppo_memory.py`; not yet run): bf16 with the memory flags, the log line
    reads torch.cuda.max_memory_allocated and every metrics row carries memory/peak_gb."""
    rm = build_rm_adapter(tiny_llama, tmp_path / "rm")
    lean = [
        "--gradient_checkpointing",
        "--per_device_forward_batch_size",
        "1",
        "--bf16",
        "--torch_dtype",
        "bfloat16",
    ]
    run_ppo_with_peft.main(ppo_argv(tiny_llama, rm, tmp_path / "gpu", *lean))
    log = capsys.readouterr().err
    assert "peak memory after optimizer step 1: " in log and "(torch.cuda.max_memory_allocated)" in log
    rows = [json.loads(line) for line in (tmp_path / "gpu" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 < r["memory/peak_gb"] < 80 for r in rows)
    assert rows[1]["memory/peak_gb"] >= rows[0]["memory/peak_gb"]  # a running maximum
