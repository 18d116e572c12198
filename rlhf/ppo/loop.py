"""The PPO loop, top to bottom: 1 generate, 2 score, 3 old and reference log-probs (and values), 4 KL-shaped
rewards, 5 advantages (:func:`collect_rollout`), then 6 PPO epochs over mini-batches and 7 log and save
(:func:`train`).

Steps 4–5 are one call to the estimator chosen by ``--advantage_estimator``
(:func:`rlhf.ppo.estimators.estimate_advantages`): ``gae`` with the learned critic, or a critic-free one
(``grpo``, ``dr_grpo``, ``rloo``, ``reinforce_pp``, ``reinforce_pp_baseline``). The loop does not branch on
which; it only asks whether the models bundle has a critic (values, value loss, critic export).

Batch sizes, per process: a generation batch is ``--per_device_train_batch_size`` prompts, each sampled
``--num_samples_per_prompt`` times (a group, on this process); a rollout is ``--rollout_batches``
generation batches; each of ``--ppo_epochs`` epochs shuffles the rollout into mini-batches of
``--per_device_mini_train_batch_size`` samples; one optimizer step per ``--gradient_accumulation_steps``
mini-batches, counted across rollouts.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.profiler import record_function
from tqdm.auto import tqdm

from rlhf.backend import Backend
from rlhf.checkpoint_dirs import rotate_checkpoints
from rlhf.errors import UserError
from rlhf.generation.base import Generator, is_eos
from rlhf.interruption import StopSignals, TrainingInterrupted, rerun_resumes
from rlhf.ppo.batch import RolloutBuffer, SequenceBatch, left_pad, pad_columns
from rlhf.ppo.checkpoint import load_checkpoint, save_checkpoint
from rlhf.ppo.config import PPOArguments, PPOTrainingArguments, rollout_size
from rlhf.ppo.data import EpochSampler, PromptSet
from rlhf.ppo.estimators import (
    EstimatorSettings,
    estimate_advantages,
    mean_group_std,
    zero_std_group_fraction,
)
from rlhf.ppo.evaluation import run_evaluation
from rlhf.ppo.kl import AdaptiveKLController, FixedKLController, masked_kl_estimate
from rlhf.ppo.losses import entropy_bonus, kl_loss, policy_loss, pretrain_weight, value_loss
from rlhf.ppo.memory import (
    forward_batch_size,
    log_peak_memory,
    peak_memory_metrics,
    score_in_chunks,
)
from rlhf.ppo.metrics import MetricsAccumulator, MetricsFile
from rlhf.ppo.policy_interface import PolicyModels
from rlhf.ppo.profiling import StepProfiler
from rlhf.ppo.resume import EVAL_SAMPLES_FILE, flag_settings
from rlhf.ppo.rewards import Scorer, shaped_scores
from rlhf.ppo.stats import explained_variance, global_masked_moments, tokens_per_process
from rlhf.publish import publish_files, staging_dir

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
    prompts: PromptSet  # the training prompts
    prompt_sampler: EpochSampler
    pretrain: torch.Tensor | None  # [N, block_size] int32
    pretrain_sampler: EpochSampler | None
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any]
    kl_controller: FixedKLController | AdaptiveKLController
    ppo: PPOArguments
    args: PPOTrainingArguments
    total_steps: int
    pad_token_id: int
    eos_token_id: int | tuple[int, ...] | None  # the sampling's: one id or several
    estimator: EstimatorSettings = field(default_factory=EstimatorSettings)  # steps 4-5
    old_logprobs: str = (
        "generator"  # --old_logprobs resolved: generator, forward or update (rlhf/ppo/session.py)
    )
    save_extra: dict[str, Any] = field(default_factory=dict)  # name -> writer(path), e.g. the tokenizer
    inputs: dict[str, str | None] = field(
        default_factory=dict
    )  # flag -> path read: a resume needs them unchanged
    eval_prompts: PromptSet | None = None  # --do_eval: the held-out prompts (rlhf/ppo/evaluation.py)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    micro_steps: int = 0  # mini-batches since the last optimizer step
    rollouts: int = 0
    samples: int = 0  # responses generated, all processes
    last_checkpoint: str | None = None
    evaluated_step: int = -1  # --do_eval: the last step evaluated (a resume makes up one a stop skipped)


def check_finite(values: dict[str, torch.Tensor | float], step: int, last_checkpoint: str | None) -> None:
    floats = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in values.items()}
    bad = {k: v for k, v in floats.items() if not math.isfinite(v)}
    if bad:
        kept = last_checkpoint or "none (no checkpoint saved yet)"
        raise NonFiniteError(f"non-finite {bad} at step {step}; stopped. Last good checkpoint: {kept}")


@torch.no_grad()
def collect_rollout(s: PPOSession, state: TrainState, metrics: MetricsAccumulator) -> RolloutBuffer:
    """Steps 1–5: one rollout of ``rollout_batches`` generation batches, scored and turned into
    advantages (and, with a critic, value targets)."""
    ppo, models, device = s.ppo, s.models, s.backend.device
    k = ppo.num_samples_per_prompt
    models.train(False)  # no dropout for sampling and for old/reference log-probs
    started = time.perf_counter()

    # 1. Generate: each prompt K times in a row (one group), left-padded -> sampled responses
    #    (right-padded after the first EOS).
    parts, prompt_texts, sampled_logprobs, prompt_lengths = [], [], [], []
    for _ in range(ppo.rollout_batches):
        rows = [i for i in s.prompt_sampler.next() for _ in range(k)]
        prompt_ids, prompt_mask = left_pad([s.prompts.ids[i] for i in rows], s.pad_token_id)
        prompt_lengths += [len(s.prompts.ids[i]) for i in rows]
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        with s.backend.autocast():
            out = s.generator.generate(prompt_ids, prompt_mask)
        ids = torch.cat([prompt_ids, out.response_ids], dim=1)
        parts.append(SequenceBatch(ids, torch.cat([prompt_mask, out.response_mask], 1), prompt_ids.shape[1]))
        prompt_texts += [s.prompts.texts[i] for i in rows]
        sampled_logprobs.append(out.logprobs)
    generate_seconds = time.perf_counter() - started  # the generators end on a host sync (response lengths)
    batch = SequenceBatch.concat(parts, s.pad_token_id)
    mask = batch.response_mask  # [N, R]
    n = mask.shape[0]
    # group labels, unique over processes and rollouts: the (rollout, replica, prompt) each response answers
    first_group = (state.rollouts * s.backend.world_size + s.backend.replica_rank) * (n // k)
    group_ids = first_group + torch.arange(n // k, device=device).repeat_interleave(k)  # [N]
    lengths = mask.sum(1).long()
    response_lengths = lengths.tolist()
    responses = s.decode(  # two device->host copies in all, not two per row
        [r[:length] for r, length in zip(batch.response_ids.tolist(), response_lengths)],
        skip_special_tokens=True,
    )
    ended = torch.zeros_like(lengths, dtype=torch.bool)
    if s.eos_token_id is not None:
        ended = (is_eos(batch.response_ids, s.eos_token_id) & mask.bool()).any(1)  # pads may equal EOS

    # 2. Score each response at its last token (a reward model in chunks of --per_device_forward_batch_size
    #    rows); clip; optionally penalise a missing EOS.
    forward_rows = forward_batch_size(ppo.per_device_forward_batch_size, ppo.per_device_mini_train_batch_size)
    with s.backend.autocast():
        raw_scores = score_in_chunks(s.scorer, batch, prompt_texts, responses, forward_rows).to(device)
    # summed over processes: non-finite in every process when it is in any, so all stop together
    total = raw_scores.sum()
    if s.backend.world_size > 1:
        total = s.backend.reduce_sum(total[None])[0]
    check_finite({"reward/score": total}, state.step + 1, state.last_checkpoint)
    scores = shaped_scores(raw_scores, ended, ppo.missing_eos_penalty, ppo.reward_score_clip)

    # 3. Old log-probs (the policy that sampled: the generator's own when it returns them and
    #    --old_logprobs allows it, else an eval-mode forward; none here when the update is on-policy and
    #    takes its own, --old_logprobs update), reference log-probs and, with a critic, values, in chunks
    #    of --per_device_forward_batch_size rows, each over the columns its own rows need. The epochs'
    #    sample orders are drawn first: with chunks of the mini-batch size (the default) each chunk is one
    #    of the first epoch's mini-batches, so a sequence has the same padding in both forwards (bf16
    #    matmuls round differently at another width: the first ratio would not be 1).
    order = torch.stack([torch.randperm(n) for _ in range(ppo.ppo_epochs)])  # [epochs, N], host
    source = s.old_logprobs
    if source == "generator" and any(lp is None for lp in sampled_logprobs):
        source = "forward"
    old_logprobs = None  # with --old_logprobs update: the update's own
    if source == "generator":
        old_logprobs = torch.cat(
            [pad_columns(lp.float(), mask.shape[1], 0.0, left=False) for lp in sampled_logprobs]
        )
    elif source == "forward":
        old_logprobs = torch.zeros(mask.shape, device=device)
    ref_logprobs = torch.zeros(mask.shape, device=device)
    values = torch.zeros(mask.shape, device=device) if models.has_critic else None
    first_epoch = order[0].tolist() if forward_rows == ppo.per_device_mini_train_batch_size else range(n)
    for start in range(0, n, forward_rows):
        host_rows = list(first_epoch[start : start + forward_rows])
        rows = torch.tensor(host_rows, device=device)
        chunk = batch.select(rows).fitted(
            max(prompt_lengths[r] for r in host_rows), max(response_lengths[r] for r in host_rows)
        )
        width = chunk.input_ids.shape[1] - chunk.prompt_len
        with s.backend.autocast():
            if source == "forward":
                old_logprobs[rows, :width] = models.policy_logprobs(chunk, ppo.temperature)[0].float()
            ref_logprobs[rows, :width] = models.reference_logprobs(chunk, ppo.temperature).float()
            if values is not None:
                values[rows, :width] = models.values(chunk).float()
    ref_logprobs = ref_logprobs * mask
    old_logprobs = old_logprobs * mask if old_logprobs is not None else None
    values = values * mask if values is not None else None

    # 4–5. Per-token KL, then rewards and advantages by --advantage_estimator (rlhf/ppo/estimators.py);
    #      whitening there is over the tokens of all processes. With --old_logprobs update the reward has
    #      no KL (rlhf/ppo/config.py, off_policy_reason) and the update measures it (ppo_mini_batch_step).
    on_policy = old_logprobs is None
    kl = (
        torch.zeros_like(ref_logprobs)
        if on_policy
        else masked_kl_estimate(old_logprobs, ref_logprobs, mask, ppo.kl_penalty)
    )
    beta = s.kl_controller.value
    estimate = estimate_advantages(
        s.estimator, scores=scores, kl=kl, mask=mask, beta=beta, group_ids=group_ids, values=values,
        reduce_sum=s.backend.reduce_sum,
    )  # fmt: skip
    order = order.to(device)

    if not on_policy:  # else no --target_kl (the controller is fixed)
        mean_kl = s.backend.mean({"kl": float(kl.sum(1).mean())})["kl"]
        s.kl_controller.update(mean_kl, n * s.backend.world_size)
    state.rollouts += 1
    state.samples += n * s.backend.world_size
    buffer = RolloutBuffer(
        batch, old_logprobs, estimate.advantages, order, ppo.per_device_mini_train_batch_size, group_ids,
        old_values=values, returns=estimate.returns,
        ref_logprobs=ref_logprobs if ppo.use_kl_loss or on_policy else None, scores=scores if on_policy else None,
    )  # fmt: skip
    # Rollout statistics: every optimizer step trained on this rollout reports them (rlhf/ppo/metrics.py);
    # they are averaged over processes there, so the spreads are taken over all processes' samples here.
    reduce_sum = s.backend.reduce_sum
    score_variance = global_masked_moments(
        raw_scores, torch.ones_like(raw_scores), reduce_sum, unbiased=False
    )[1]
    kl_penalty = -beta * kl  # kl is zero outside the mask
    stats = {
        "reward/score": float(raw_scores.mean()),
        "reward/score_std": float(score_variance.sqrt()),
        "objective/kl_coef": beta,  # the coefficient this rollout's rewards used (the controller moved on)
        "response/length_mean": float(lengths.float().mean()),
        "response/eos_frac": float(ended.float().mean()),
        "time/generate_per_rollout_s": generate_seconds,
    }
    if not on_policy:  # else each mini-batch reports them from its update's log-probs
        stats["objective/kl"] = float(kl.sum(1).mean())
        stats["objective/rlhf_reward"] = float((scores + kl_penalty.sum(1)).mean())
    if values is not None:
        stats["value/explained_variance"] = float(
            explained_variance(values, estimate.returns, mask, reduce_sum)
        )
    if k > 1:
        stats["reward/score_group_std"] = float(mean_group_std(scores, group_ids))
        stats["reward/frac_zero_std"] = float(zero_std_group_fraction(scores, group_ids))
    metrics.start_rollout(stats, seconds=time.perf_counter() - started, mini_batches=buffer.num_mini_batches)
    return buffer


LOSS_KEYS = ("loss/policy", "loss/pretrain", "loss/kl", "loss/value")  # checked finite before a step


def ppo_mini_batch_step(
    s: PPOSession, buffer: RolloutBuffer, state: TrainState
) -> dict[str, torch.Tensor | float]:
    """Step 6 for one mini-batch: losses and their gradients (accumulated, not yet applied). Its metrics are
    0-dim device tensors (and floats), read on the host with the other mini-batches' before the optimizer
    step (:func:`settle_mini_batches`): no wait for the device between the forward and its backward."""
    ppo, models, backend = s.ppo, s.models, s.backend
    batch, old = buffer.mini_batch(buffer.cursor)
    mask = batch.response_mask
    accumulation = s.args.gradient_accumulation_steps
    # token means divide by the mini-batch's tokens per process: the processes' gradients are averaged,
    # so every token of the global mini-batch weighs the same (docs/ppo.md, --loss_agg_mode)
    tokens = tokens_per_process(mask, backend.reduce_sum, backend.world_size)
    with backend.autocast():
        # at --entropy_coef 0 (the default) the entropy is a metric only: no backward through it
        logprobs, entropy = models.policy_logprobs(
            batch, ppo.temperature, with_entropy=True, entropy_grad=ppo.entropy_coef != 0
        )
        # --old_logprobs update: the weights that sampled are these (one epoch, no optimizer step inside a
        # rollout), so the old log-probs are this forward's, detached: the ratio is 1, its gradient the
        # policy gradient's
        on_policy = "old_logprobs" not in old
        old_logprobs = logprobs.detach() if on_policy else old["old_logprobs"]
        policy = policy_loss(
            logprobs, old_logprobs, old["advantages"], mask, ppo.ratio_clip, ppo.loss_agg_mode,
            ppo.max_response_length, tokens,
        )  # fmt: skip
        entropy_mean = entropy_bonus(entropy, mask, tokens)
        pretrain = torch.zeros((), device=backend.device)
        w_pt = 0.0  # no pretraining data: no such loss, whatever --pretrain_loss_weight says
        if s.pretrain is not None:
            pretrain = models.pretrain_loss(
                s.pretrain[s.pretrain_sampler.next()].to(backend.device, torch.long)
            )
            w_pt = pretrain_weight(state.step, ppo.pretrain_loss_weight, ppo.pretrain_warmup_steps)
        actor_loss = ppo.actor_loss_weight * policy.loss - ppo.entropy_coef * entropy_mean + w_pt * pretrain
        kl = torch.zeros((), device=backend.device)
        if ppo.use_kl_loss:  # the KL in the loss instead of the reward (--use_kl_loss)
            kl = kl_loss(logprobs, old["ref_logprobs"], mask, tokens)
            actor_loss = actor_loss + s.kl_controller.value * kl
    backend.backward(actor_loss / accumulation)
    out: dict[str, torch.Tensor | float] = {
        "loss/policy": policy.loss.detach(),
        "loss/pretrain": pretrain.detach(),
        "loss/pretrain_weight": w_pt,
        "policy/clipfrac": policy.clipfrac,
        "policy/approxkl": policy.approxkl.detach(),
        "policy/entropy": entropy_mean.detach(),
    }
    if ppo.use_kl_loss:
        out["loss/kl"] = kl.detach()
    if on_policy:  # the rollout statistics the rollout could not compute without the old log-probs
        kl_rows = masked_kl_estimate(old_logprobs, old["ref_logprobs"], mask, ppo.kl_penalty).sum(1)
        out["objective/kl"] = kl_rows.mean()
        out["objective/rlhf_reward"] = (old["scores"] - s.kl_controller.value * kl_rows).mean()
    if models.has_critic:
        with backend.autocast():
            value = value_loss(
                models.values(batch).float(), old["old_values"], old["returns"], mask, ppo.value_clip, tokens
            )
        backend.backward(ppo.critic_loss_weight * value.loss / accumulation)
        out |= {"loss/value": value.loss.detach(), "value/clipfrac": value.clipfrac}
    buffer.cursor += 1
    return out


def settle_mini_batches(
    pending: list[dict[str, torch.Tensor | float]],
    s: PPOSession,
    state: TrainState,
    metrics: MetricsAccumulator,
) -> None:
    """Read the metrics of the mini-batches trained since the last call in one device-to-host copy, refuse
    non-finite losses (in every process when any has one, before the optimizer step: no weight takes them),
    and add them to ``metrics``; ``pending`` is emptied. Called before each optimizer step and before a new
    rollout (whose statistics the mini-batches after it count)."""
    if not pending:
        return
    keys = [
        (row, key) for row, out in enumerate(pending) for key, v in out.items() if isinstance(v, torch.Tensor)
    ]
    if keys:
        values = torch.stack([pending[row][key].detach().float().reshape(()) for row, key in keys]).tolist()
        for (row, key), value in zip(keys, values):
            pending[row][key] = value
    bad = [out for out in pending if not all(math.isfinite(v) for k, v in out.items() if k in LOSS_KEYS)]
    anywhere = bool(bad)
    if s.backend.world_size > 1:  # all stop together, or the others would wait in the next all-reduce
        anywhere = (
            float(s.backend.reduce_sum(torch.tensor([float(anywhere)], device=s.backend.device))[0]) > 0
        )
    if anywhere:
        for out in bad:
            check_finite(
                {k: v for k, v in out.items() if k in LOSS_KEYS}, state.step + 1, state.last_checkpoint
            )
        raise NonFiniteError(
            f"non-finite loss in another process at step {state.step + 1}; stopped. Last good checkpoint: "
            f"{state.last_checkpoint or 'none (no checkpoint saved yet)'}"
        )
    for out in pending:
        metrics.add_mini_batch(out)
    pending.clear()


def train(s: PPOSession, resume_from: str | None = None) -> TrainState:
    """Run PPO until ``s.total_steps`` optimizer steps; returns the final state."""
    args, backend = s.args, s.backend
    output_dir = Path(args.output_dir)
    state, metrics, buffer = TrainState(), MetricsAccumulator(), None
    metrics_file = MetricsFile(output_dir / "metrics.jsonl")
    samples_file = MetricsFile(output_dir / EVAL_SAMPLES_FILE)  # --do_eval's responses
    if resume_from:
        shared, rank_state, buffer = load_checkpoint(
            Path(resume_from),
            backend=backend,
            models=s.models,
            optimizers=s.optimizers,
            schedulers=s.schedulers,
            settings=resume_settings(s),
        )
        state = TrainState(**shared["state"])
        s.prompt_sampler.load_state(shared["prompt_sampler"])
        if s.pretrain_sampler is not None:
            s.pretrain_sampler.load_state(shared["pretrain_sampler"])
        s.kl_controller.value = shared["kl_coef"]
        metrics.load_state(rank_state["metrics"])
    if backend.is_main:
        metrics_file.truncate_after(state.step if resume_from else -1)
        samples_file.truncate_after(state.step if resume_from else -1)
    per_rollout = s.ppo.ppo_epochs * rollout_size(s.ppo, args) // s.ppo.per_device_mini_train_batch_size
    logger.info(
        "each rollout: %d samples per process x %d processes -> %d mini-batches (%d epochs) -> %.2f "
        "optimizer steps (accumulation %d); training for %d optimizer steps",
        rollout_size(s.ppo, args), backend.world_size, per_rollout,
        s.ppo.ppo_epochs, per_rollout / args.gradient_accumulation_steps, args.gradient_accumulation_steps,
        s.total_steps,
    )  # fmt: skip
    if state.step >= s.total_steps:
        logger.info(
            "the run in %s already reached step %d of %d: nothing to train (the final model is saved again; "
            "a larger --max_steps or --num_train_epochs trains on, --overwrite_output_dir starts afresh)",
            args.output_dir, state.step, s.total_steps,
        )  # fmt: skip
    timer = {"since": time.perf_counter(), "samples": state.samples, "steps": state.step}
    first_step = state.step + 1  # its end logs the peak memory (rlhf/ppo/memory.py)
    progress = tqdm(
        total=s.total_steps, initial=state.step, desc="ppo", disable=not backend.is_main or args.disable_tqdm
    )
    # a stop signal (Ctrl-C, SIGTERM) ends the loop after the step in flight and a checkpoint (rlhf/interruption.py)
    profiler = StepProfiler(
        args.profile_step, output_dir, backend.device, backend.is_main, first_step, s.total_steps
    )
    pending: list[dict[str, torch.Tensor | float]] = []  # the metrics of mini-batches not yet read
    with StopSignals() as stop, progress:
        # --do_eval: the policy before training; after a resume, an evaluation the stop skipped, or the end's
        if (
            s.eval_prompts is not None
            and state.evaluated_step != state.step
            and (state.step % args.eval_every == 0 or state.step >= s.total_steps)  # step 0 too
        ):
            timer["since"] += evaluate(s, state, metrics_file, samples_file, progress)
            stop_signal = stop.agreed(backend.device) if state.step < s.total_steps else 0
            if stop_signal:  # nothing trained since the checkpoint it resumed from (if any)
                resumes = rerun_resumes(args.overwrite_output_dir, args.resume_from_checkpoint)
                raise TrainingInterrupted(stop_signal, state.step, state.last_checkpoint, resumes)
        while state.step < s.total_steps:
            profiler.before(state.step + 1)
            if buffer is None or buffer.exhausted:
                settle_mini_batches(pending, s, state, metrics)
                progress.set_postfix_str(f"rollout {state.rollouts + 1}", refresh=True)  # a long first step
                with record_function("ppo/rollout"):  # a label in --profile_step's trace
                    buffer = collect_rollout(s, state, metrics)  # steps 1-5
                progress.set_postfix_str("update", refresh=True)

            # 6. PPO epochs over mini-batches; an optimizer step every `gradient_accumulation_steps` of them.
            s.models.train(True)
            start = time.perf_counter()
            with record_function("ppo/mini_batch"):
                pending.append(ppo_mini_batch_step(s, buffer, state))
            state.micro_steps += 1
            if state.micro_steps < args.gradient_accumulation_steps:
                metrics.add({"time/train_s": time.perf_counter() - start})
                continue
            settle_mini_batches(pending, s, state, metrics)
            with record_function("ppo/optimizer_step"):
                norms = backend.step(
                    s.optimizers, s.schedulers, s.models.parameter_groups(), args.max_grad_norm
                )
            state.step, state.micro_steps = state.step + 1, 0
            metrics.add(
                {"time/train_s": time.perf_counter() - start}
                | {f"grad_norm/{k}": v for k, v in norms.items()}
                | fp16_metrics(backend.loss_scale(), norms)
            )
            progress.update(1)
            profiler.after(state.step)
            if state.step == first_step:
                log_peak_memory(backend.device, state.step)

            # 7. Log every `logging_steps` and at the end (a signal's pending metrics go into the checkpoint);
            # save every `save_steps`, at the end and when a process was signalled.
            last = state.step == s.total_steps
            if state.step % args.logging_steps == 0 or last or (args.logging_first_step and state.step == 1):
                write_log(s, state, metrics, metrics_file, timer)
            stop_signal = 0 if last else stop.agreed(backend.device)
            # a stop saves at once: the evaluation due now is left to the resumed run
            if s.eval_prompts is not None and not stop_signal and (state.step % args.eval_every == 0 or last):
                timer["since"] += evaluate(s, state, metrics_file, samples_file, progress)
            if state.step % args.save_steps == 0 or last or stop_signal:
                save_step_checkpoint(s, state, metrics, buffer)
            if stop_signal:
                resumes = rerun_resumes(args.overwrite_output_dir, args.resume_from_checkpoint)
                raise TrainingInterrupted(stop_signal, state.step, state.last_checkpoint, resumes)
    return state


def evaluate(
    s: PPOSession, state: TrainState, metrics_file: MetricsFile, samples_file: MetricsFile, progress: tqdm
) -> float:
    """``--do_eval`` at the current step (:func:`rlhf.ppo.evaluation.run_evaluation`); returns its seconds,
    which the loop leaves out of ``samples_per_s``."""
    progress.set_postfix_str("eval", refresh=True)
    seconds = run_evaluation(s, state.step, metrics_file, samples_file)
    state.evaluated_step = state.step
    return seconds


def fp16_metrics(loss_scale: float | None, norms: dict[str, float]) -> dict[str, float]:
    """Under --fp16: the loss scale after this step and whether an overflow skipped an update in it (a
    window's mean is then the share of its steps skipped); nothing without loss scaling."""
    if loss_scale is None:
        return {}
    skipped = not all(math.isfinite(v) for v in norms.values())
    return {"fp16/loss_scale": loss_scale, "fp16/skipped_frac": float(skipped)}


def resume_settings(s: PPOSession) -> dict[str, Any]:
    """What a run resumed from a checkpoint must share with the run that wrote it: the settings its flags
    and files decide (:func:`rlhf.ppo.resume.flag_settings`, also checked before the models load), the
    numbers of prompts and pretraining blocks that decide what comes next, and the adapters' alphas."""
    processes = dist.get_world_size() if dist.is_initialized() else 1
    return (
        flag_settings(s.args, s.ppo, s.inputs, processes)
        | {
            "number of prompts": len(s.prompts),
            "number of prompts held out by --do_eval": 0 if s.eval_prompts is None else len(s.eval_prompts),
            "number of pretraining blocks": 0 if s.pretrain is None else int(s.pretrain.shape[0]),
        }
        | s.models.adapter_settings()
    )


def save_step_checkpoint(
    s: PPOSession, state: TrainState, metrics: MetricsAccumulator, buffer: RolloutBuffer
) -> None:
    """``checkpoint-<step>`` in ``--output_dir``: everything a resumed run needs to go on bit-identically
    (models, optimizers, schedulers, samplers, the KL coefficient, pending metrics, the rollout in use)."""
    args, backend = s.args, s.backend
    name = Path(args.output_dir) / f"checkpoint-{state.step}"
    state.last_checkpoint = str(name)
    shared = {
        "step": state.step,
        "settings": resume_settings(s),
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
        rotate_checkpoints(Path(args.output_dir), args.save_total_limit, name)


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
    for name, scheduler in s.schedulers.items():  # actor, and critic when there is one
        record[f"lr/{name}"] = scheduler.get_last_lr()[0]
    record["samples_per_s"] = (state.samples - timer["samples"]) / max(elapsed, 1e-9)
    record["rollouts"] = state.rollouts
    record |= peak_memory_metrics(s.backend.device)  # memory/peak_gb on GPU (this process)
    timer.update(since=time.perf_counter(), samples=state.samples, steps=state.step)
    metrics.reset()
    if s.backend.is_main:
        metrics_file.append(record)
        s.backend.log({k: v for k, v in record.items() if k != "step"}, state.step)
        shown = {
            "score": "reward/score",
            "kl": "objective/kl",
            "policy": "loss/policy",
            "value": "loss/value",
            "entropy": "policy/entropy",
            "eos": "response/eos_frac",  # a policy that stops ending its responses shows here first
        }
        logger.info(
            "step %d: %s", state.step,
            " ".join(f"{name} {record[key]:.4g}" for name, key in shown.items() if record.get(key) is not None),
        )  # fmt: skip


def save_outputs(s: PPOSession, critic_dir: Path | None) -> None:
    """Final outputs: the actor (+ tokenizer) in ``--output_dir``, the critic in ``critic_dir`` when the
    models bundle has one (``critic_dir`` is then required)."""
    output_dir = Path(s.args.output_dir)
    dirs = [output_dir] + ([critic_dir] if s.models.has_critic else [])

    def export() -> None:
        s.models.save_actor(output_dir)
        if s.models.has_critic:
            s.models.save_critic(critic_dir)

    s.backend.run_export(export)
    if s.backend.is_main:
        for directory in dirs:  # staged, then moved in: a kill never leaves a half-written tokenizer file
            staging = staging_dir(directory.parent / f"{directory.name}.extra")
            for writer in s.save_extra.values():
                writer(staging)
            publish_files(staging, directory)
        where = f", critic to {critic_dir}" if s.models.has_critic else " (no critic)"
        logger.info("actor saved to %s%s", output_dir, where)
        metrics = Path(s.args.output_dir) / "metrics.jsonl"
        if metrics.is_file():
            logger.info("metrics in %s (curves: python -m rlhf.plot %s)", metrics, metrics.parent)
    s.backend.barrier()
