"""The PPO loop, top to bottom: 1 generate, 2 score, 3 old and reference log-probs, 4 KL-shaped rewards,
5 advantages (:func:`collect_rollout`), then 6 PPO epochs over mini-batches and 7 log and save
(:func:`train`).

Batch sizes, per process: a generation batch is ``--per_device_train_batch_size`` prompts; a rollout is
``--rollout_batches`` generation batches; each of ``--ppo_epochs`` epochs shuffles the rollout into
mini-batches of ``--per_device_mini_train_batch_size``; one optimizer step per
``--gradient_accumulation_steps`` mini-batches, counted across rollouts.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhf.backend import Backend
from rlhf.errors import UserError
from rlhf.generation.base import Generator
from rlhf.ppo.advantages import gae_advantages
from rlhf.ppo.batch import RolloutBuffer, SequenceBatch, left_pad, pad_columns
from rlhf.ppo.checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint
from rlhf.ppo.config import PPOArguments, PPOTrainingArguments
from rlhf.ppo.data import EpochSampler, PromptSet
from rlhf.ppo.kl import AdaptiveKLController, FixedKLController, kl_estimate, kl_shaped_rewards
from rlhf.ppo.losses import entropy_bonus, policy_loss, pretrain_weight, value_loss
from rlhf.ppo.metrics import MetricsAccumulator, MetricsFile
from rlhf.ppo.policy_interface import PolicyModels
from rlhf.ppo.rewards import Scorer
from rlhf.ppo.stats import explained_variance, masked_whiten

logger = logging.getLogger(__name__)


class NonFiniteError(UserError):
    """A loss or reward became NaN/inf; the run stops and keeps its last good checkpoint."""


@dataclass
class PPOSession:
    """Everything the loop needs, assembled by :func:`rlhf.ppo.session.assemble_session`."""

    models: PolicyModels
    generator: Generator
    scorer: Scorer
    backend: Backend
    decode: Any  # token id lists -> texts (tokenizer.batch_decode)
    prompts: PromptSet
    prompt_sampler: EpochSampler
    pretrain: torch.Tensor | None  # [N, block_size]
    pretrain_sampler: EpochSampler | None
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any]
    kl_controller: FixedKLController | AdaptiveKLController
    ppo: PPOArguments
    args: PPOTrainingArguments
    total_steps: int
    pad_token_id: int
    eos_token_id: int | None
    save_extra: dict[str, Any] = field(default_factory=dict)  # name -> writer(path), e.g. the tokenizer


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    micro_steps: int = 0  # mini-batches since the last optimizer step
    rollouts: int = 0
    samples: int = 0  # responses generated, all processes
    last_checkpoint: str | None = None


def check_finite(values: dict[str, torch.Tensor | float], step: int, last_checkpoint: str | None) -> None:
    floats = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in values.items()}
    bad = {k: v for k, v in floats.items() if not math.isfinite(v)}
    if bad:
        kept = last_checkpoint or "none (no checkpoint saved yet)"
        raise NonFiniteError(f"non-finite {bad} at step {step}; stopped. Last good checkpoint: {kept}")


def _chunks(n: int, size: int) -> list[torch.Tensor]:
    return [torch.arange(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def collect_rollout(s: PPOSession, state: TrainState, metrics: MetricsAccumulator) -> RolloutBuffer:
    """Steps 1–5: one rollout of ``rollout_batches`` generation batches, scored and turned into
    advantages and returns."""
    ppo, models, device = s.ppo, s.models, s.backend.device
    models.train(False)  # no dropout for sampling and for old/reference log-probs
    start = time.perf_counter()

    # 1. Generate: left-padded prompts -> sampled responses (right-padded after the first EOS).
    parts, prompt_texts, sampled_logprobs = [], [], []
    for _ in range(ppo.rollout_batches):
        rows = s.prompt_sampler.next()
        prompt_ids, prompt_mask = left_pad([s.prompts.ids[i] for i in rows], s.pad_token_id)
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        with s.backend.autocast():
            out = s.generator.generate(prompt_ids, prompt_mask)
        ids = torch.cat([prompt_ids, out.response_ids], dim=1)
        parts.append(SequenceBatch(ids, torch.cat([prompt_mask, out.response_mask], 1), prompt_ids.shape[1]))
        prompt_texts += [s.prompts.texts[i] for i in rows]
        sampled_logprobs.append(out.logprobs)
    batch = SequenceBatch.concat(parts, s.pad_token_id)
    mask = batch.response_mask  # [N, R]
    lengths = mask.sum(1).long()
    responses = s.decode(
        [r[:n].tolist() for r, n in zip(batch.response_ids, lengths)], skip_special_tokens=True
    )
    ended = torch.zeros_like(lengths, dtype=torch.bool)
    if s.eos_token_id is not None:
        ended = (batch.response_ids == s.eos_token_id).any(1)

    # 2. Score each response at its last token; clip; optionally penalise a missing EOS.
    with s.backend.autocast():
        raw_scores = s.scorer.score(batch, prompt_texts, responses).to(device)
    check_finite({"reward/score": raw_scores.sum()}, state.step + 1, state.last_checkpoint)
    scores = raw_scores.clone()
    if ppo.missing_eos_penalty is not None:
        scores[~ended] -= ppo.missing_eos_penalty
    scores = scores.clamp(-ppo.reward_score_clip, ppo.reward_score_clip)

    # 3. Old log-probs (the policy that sampled: the generator's own when it returns them, else an
    #    eval-mode forward), reference log-probs and values, in mini-batch chunks.
    from_generator = all(lp is not None for lp in sampled_logprobs)
    old_logprobs, ref_logprobs, values = [], [], []
    if from_generator:
        old_logprobs = [pad_columns(lp.float(), mask.shape[1], 0.0, left=False) for lp in sampled_logprobs]
    for rows in _chunks(mask.shape[0], ppo.per_device_mini_train_batch_size):
        chunk = batch.select(rows.to(device))
        with s.backend.autocast():
            if not from_generator:
                old_logprobs.append(models.policy_logprobs(chunk, ppo.temperature)[0].float())
            ref_logprobs.append(models.reference_logprobs(chunk, ppo.temperature).float())
            values.append(models.values(chunk).float())
    old_logprobs, ref_logprobs = torch.cat(old_logprobs) * mask, torch.cat(ref_logprobs) * mask
    values = torch.cat(values) * mask

    # 4. KL-shaped rewards: r_t = -β·KL_t, plus the score at the last response token.
    kl = kl_estimate(old_logprobs, ref_logprobs, ppo.kl_penalty) * mask
    rewards, non_score = kl_shaped_rewards(scores, kl, mask, s.kl_controller.value)
    if ppo.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False) * mask

    # 5. Advantages (GAE) and returns; advantages whitened over the rollout.
    advantages, returns = gae_advantages(rewards, values, mask, ppo.gamma, ppo.lam)
    advantages = masked_whiten(advantages, mask) * mask
    n = mask.shape[0]
    order = torch.stack([torch.randperm(n) for _ in range(ppo.ppo_epochs)]).to(device)

    mean_kl = s.backend.mean({"kl": float(kl.sum(1).mean())})["kl"]
    s.kl_controller.update(mean_kl, n * s.backend.world_size)
    state.rollouts += 1
    state.samples += n * s.backend.world_size
    buffer = RolloutBuffer(
        batch, old_logprobs, values, advantages, returns, order, ppo.per_device_mini_train_batch_size
    )
    # Rollout statistics: every optimizer step trained on this rollout reports them (rlhf/ppo/metrics.py).
    metrics.start_rollout(
        {
            "reward/score": float(raw_scores.mean()),
            "reward/score_std": float(raw_scores.std(unbiased=False)),
            "objective/kl": float(kl.sum(1).mean()),
            "objective/rlhf_reward": float((scores + non_score.sum(1)).mean()),
            "objective/kl_coef": s.kl_controller.value,
            "value/explained_variance": float(explained_variance(values, returns, mask)),
            "response/length_mean": float(lengths.float().mean()),
            "response/eos_frac": float(ended.float().mean()),
        },
        seconds=time.perf_counter() - start,
        mini_batches=buffer.num_mini_batches,
    )
    return buffer


def ppo_mini_batch_step(s: PPOSession, buffer: RolloutBuffer, state: TrainState) -> dict[str, float]:
    """Step 6 for one mini-batch: losses and their gradients (accumulated, not yet applied)."""
    ppo, models, backend = s.ppo, s.models, s.backend
    batch, old = buffer.mini_batch(buffer.cursor)
    mask = batch.response_mask
    accumulation = s.args.gradient_accumulation_steps
    with backend.autocast():
        logprobs, entropy = models.policy_logprobs(batch, ppo.temperature, with_entropy=True)
        policy = policy_loss(logprobs, old["old_logprobs"], old["advantages"], mask, ppo.ratio_clip)
        entropy_mean = entropy_bonus(entropy, mask)
        pretrain = torch.zeros((), device=backend.device)
        if s.pretrain is not None:
            pretrain = models.pretrain_loss(s.pretrain[s.pretrain_sampler.next()].to(backend.device))
        w_pt = pretrain_weight(state.step, ppo.pretrain_loss_weight, ppo.pretrain_warmup_steps)
        actor_loss = ppo.actor_loss_weight * policy.loss - ppo.entropy_coef * entropy_mean + w_pt * pretrain
    check_finite(
        {"loss/policy": policy.loss, "loss/pretrain": pretrain}, state.step + 1, state.last_checkpoint
    )
    backend.backward(actor_loss / accumulation)
    with backend.autocast():
        value = value_loss(
            models.values(batch).float(), old["old_values"], old["returns"], mask, ppo.value_clip
        )
    check_finite({"loss/value": value.loss}, state.step + 1, state.last_checkpoint)
    backend.backward(ppo.critic_loss_weight * value.loss / accumulation)
    buffer.cursor += 1
    return {
        "loss/policy": policy.loss.item(),
        "loss/value": value.loss.item(),
        "loss/pretrain": pretrain.item(),
        "loss/pretrain_weight": w_pt,
        "policy/clipfrac": float(policy.clipfrac),
        "policy/approxkl": float(policy.approxkl),
        "policy/entropy": entropy_mean.item(),
        "value/clipfrac": float(value.clipfrac),
    }


def train(s: PPOSession, resume_from: str | None = None) -> TrainState:
    """Run PPO until ``s.total_steps`` optimizer steps; returns the final state."""
    args, backend = s.args, s.backend
    output_dir = Path(args.output_dir)
    state, metrics, buffer = TrainState(), MetricsAccumulator(), None
    metrics_file = MetricsFile(output_dir / "metrics.jsonl")
    if resume_from:
        shared, rank_state, buffer = load_checkpoint(
            Path(resume_from),
            backend=backend,
            models=s.models,
            optimizers=s.optimizers,
            schedulers=s.schedulers,
        )
        state = TrainState(**shared["state"])
        s.prompt_sampler.load_state(shared["prompt_sampler"])
        if s.pretrain_sampler is not None:
            s.pretrain_sampler.load_state(shared["pretrain_sampler"])
        s.kl_controller.value = shared["kl_coef"]
        metrics.load_state(rank_state["metrics"])
    if backend.is_main:
        metrics_file.truncate_after(state.step if resume_from else -1)
    per_rollout = s.ppo.ppo_epochs * s.args.per_device_train_batch_size * s.ppo.rollout_batches
    per_rollout //= s.ppo.per_device_mini_train_batch_size
    logger.info(
        "each rollout: %d samples per process x %d processes -> %d mini-batches (%d epochs) -> %.2f "
        "optimizer steps (accumulation %d); training for %d optimizer steps",
        args.per_device_train_batch_size * s.ppo.rollout_batches, backend.world_size, per_rollout,
        s.ppo.ppo_epochs, per_rollout / args.gradient_accumulation_steps, args.gradient_accumulation_steps,
        s.total_steps,
    )  # fmt: skip
    progress = tqdm(
        total=s.total_steps, initial=state.step, desc="ppo", disable=not backend.is_main or args.disable_tqdm
    )
    timer = {"since": time.perf_counter(), "samples": state.samples, "steps": state.step}
    while state.step < s.total_steps:
        if buffer is None or buffer.exhausted:
            buffer = collect_rollout(s, state, metrics)  # steps 1-5

        # 6. PPO epochs over mini-batches; an optimizer step every `gradient_accumulation_steps` of them.
        s.models.train(True)
        start = time.perf_counter()
        metrics.add_mini_batch(ppo_mini_batch_step(s, buffer, state))
        state.micro_steps += 1
        if state.micro_steps < args.gradient_accumulation_steps:
            metrics.add({"time/train_s": time.perf_counter() - start})
            continue
        norms = backend.step(s.optimizers, s.schedulers, s.models.parameter_groups(), args.max_grad_norm)
        state.step, state.micro_steps = state.step + 1, 0
        metrics.add(
            {"time/train_s": time.perf_counter() - start} | {f"grad_norm/{k}": v for k, v in norms.items()}
        )
        progress.update(1)

        # 7. Log every `logging_steps`, save every `save_steps` (and at the end).
        if state.step % args.logging_steps == 0 or (args.logging_first_step and state.step == 1):
            write_log(s, state, metrics, metrics_file, timer)
        if state.step % args.save_steps == 0 or state.step == s.total_steps:
            name = output_dir / f"checkpoint-{state.step}"
            state.last_checkpoint = str(name)
            shared = {
                "step": state.step,
                "state": state.__dict__,
                "prompt_sampler": s.prompt_sampler.state(),
                "pretrain_sampler": s.pretrain_sampler.state() if s.pretrain_sampler else None,
                "kl_coef": s.kl_controller.value,
            }
            save_checkpoint(
                name, backend=backend, models=s.models, optimizers=s.optimizers, schedulers=s.schedulers,
                shared_state=shared, rank_state={"metrics": metrics.state()},
                buffer=None if buffer.exhausted else buffer, extra_files=s.save_extra,
            )  # fmt: skip
            if backend.is_main:
                prune_checkpoints(output_dir, args.save_total_limit)
    progress.close()
    return state


def write_log(
    s: PPOSession, state: TrainState, metrics: MetricsAccumulator, metrics_file: MetricsFile, timer: dict
) -> None:
    """Average the metrics since the last log over time and processes; write metrics.jsonl and trackers."""
    means = metrics.means()
    time_metrics = {"time/rollout_s", "time/train_s"}
    means = {k: v for k, v in means.items() if k not in time_metrics}
    steps = max(state.step - timer["steps"], 1)
    means["time/rollout_s"] = sum(metrics.values.get("time/rollout_s", [])) / steps
    means["time/train_s"] = sum(metrics.values.get("time/train_s", [])) / steps
    means = s.backend.mean(means)
    elapsed = time.perf_counter() - timer["since"]
    record: dict[str, Any] = {"step": state.step}
    record |= dict(sorted(means.items()))
    record["lr/actor"] = s.schedulers["actor"].get_last_lr()[0]
    record["lr/critic"] = s.schedulers["critic"].get_last_lr()[0]
    record["samples_per_s"] = (state.samples - timer["samples"]) / max(elapsed, 1e-9)
    record["rollouts"] = state.rollouts
    timer.update(since=time.perf_counter(), samples=state.samples, steps=state.step)
    metrics.reset()
    if s.backend.is_main:
        metrics_file.append(record)
        s.backend.log({k: v for k, v in record.items() if k != "step"}, state.step)
        logger.info(
            "step %d: score %.3f kl %.4f policy %.4f value %.4f", state.step, record.get("reward/score", math.nan),
            record.get("objective/kl", math.nan), record.get("loss/policy", math.nan), record.get("loss/value", math.nan),
        )  # fmt: skip


def save_outputs(s: PPOSession, critic_dir: Path) -> None:
    """Final outputs: the actor (+ tokenizer) in ``--output_dir``, the critic in ``critic_dir``."""
    output_dir = Path(s.args.output_dir)
    s.backend.run_export(lambda: (s.models.save_actor(output_dir), s.models.save_critic(critic_dir)))
    if s.backend.is_main:
        for writer in s.save_extra.values():
            writer(output_dir)
            writer(critic_dir)
        logger.info("actor saved to %s, critic to %s", output_dir, critic_dir)
    s.backend.barrier()
