"""GSM8K evaluation of a tensor-parallel solver.

::

    torchrun --nproc_per_node 8 -m rlhf.tp.solver_evaluate --task GSM8K --ckpt_dir /path/to/ckpt/ \\
        --log_dir /path/to/log/ --label_file dataset/GSM8K/test.json --model_type llama-1-7b --max_batch_size 384
    python -m rlhf.tp.solver_evaluate ...        # one process (TP=1), CPU or one GPU

``--ckpt_dir`` is a shard dir (``checkpoint_split.py``, world size = shard count) or a plain HF model dir
(optionally with ``--peft_path``, or an adapter dir), as the ``run_*`` scripts save. Solutions come from
the rollout engine (:mod:`rlhf.generation`: static KV cache, CUDA graphs on GPU). Greedy by default;
``--temperature T --num_samples K`` samples K solutions per question; ``--verifier_ckpt_dir DIR`` then
also ranks them with a verifier (``verifier_train``) and reports best-of-N next to greedy and majority-vote
accuracy. Writes ``log_dir/predictions.jsonl`` (one row per question and sample) and
``log_dir/metrics.json``; an interrupted run's finished batches are kept in ``log_dir`` and the same
command generates only the rest (:mod:`rlhf.tp.solution_log`). See ``docs/tp.md``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from rlhf.args import check_output_dir, parse_args, split_comma_list
from rlhf.data import load_dataset_dir
from rlhf.data.files import files_signature
from rlhf.data.gsm8k import answers_match, extract_prediction
from rlhf.data.templates import encode_prompt_text
from rlhf.errors import ConfigError, exit_on_user_error
from rlhf.generation import SamplingConfig, build_generator
from rlhf.generation.base import stop_ids
from rlhf.logging_setup import setup_logging
from rlhf.models.loading import load_tokenizer
from rlhf.ppo.batch import left_pad
from rlhf.publish import write_text_atomic
from rlhf.tp.distributed import barrier, device, init_model_parallel, is_main, process_group_scope
from rlhf.tp.loading import check_checkpoint, generation_eos_ids, load_tp_model, resolve_tp_dtype
from rlhf.tp.prompt import gsm8k_prompt
from rlhf.tp.solution_log import SolutionLog, seeded
from rlhf.tp.verifier import check_verifier_dir

logger = logging.getLogger(__name__)
TASKS = ("GSM8K",)


@dataclass
class SolverEvaluateArguments:
    ckpt_dir: str = field(
        metadata={"help": "shard dir (params.json + consolidated.NN.pth) or an HF model dir"}
    )
    log_dir: str = field(metadata={"help": "where predictions.jsonl and metrics.json are written"})
    label_file: str = field(metadata={"help": "GSM8K questions with answers (.json/.jsonl file or dir)"})
    task: str = field(default="GSM8K", metadata={"help": "benchmark (GSM8K)"})
    model_type: str | None = field(
        default=None, metadata={"help": "family or preset (llama, qwen2, llama-2-7b, qwen-72b, ...); checked"}
    )
    max_batch_size: int = field(default=32, metadata={"help": "prompts generated together"})
    max_gen_len: int = field(default=256, metadata={"help": "new tokens per solution at most"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy; > 0 samples"})
    top_p: float = field(
        default=1.0, metadata={"help": "nucleus sampling threshold (with --temperature > 0)"}
    )
    num_samples: int = field(default=1, metadata={"help": "solutions per question (needs --temperature > 0)"})
    stop: str | None = field(
        default=None, metadata={"help": "comma-separated stop strings (default: EOS only)"}
    )
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    generation_engine: str = field(
        default="auto",
        metadata={"help": "auto or static: the rollout engine (static KV cache, CUDA graphs on GPU); the TP "
                  "model has no Hugging Face generate, so hf is refused"},
    )  # fmt: skip
    peft_path: str | None = field(
        default=None, metadata={"help": "LoRA adapter merged into an HF --ckpt_dir"}
    )
    dtype: str = field(
        default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16"}
    )
    limit: int | None = field(
        default=None,
        metadata={"help": "evaluate only the first N questions; unset, 0 or -1 = all (as --max_steps -1)"},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the tokenizer's own code (Qwen)"})
    verifier_ckpt_dir: str | None = field(
        default=None,
        metadata={
            "help": "verifier_train's --save_dir (or its merged HF dir): best-of-N over the samples, plus a "
            "greedy pass"
        },
    )

    def validate(self) -> None:
        check_output_dir(self.log_dir, "--log_dir")
        if self.limit is not None and self.limit <= 0:
            self.limit = None  # all questions (a slice [:-1] would drop the last, [:0] keep none)
        if self.task.upper() not in TASKS:
            raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.max_batch_size < 1 or self.max_gen_len < 1:
            raise ConfigError("--max_batch_size and --max_gen_len must be >= 1")
        if self.num_samples < 1:
            raise ConfigError(f"--num_samples must be >= 1, got {self.num_samples}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.num_samples > 1 and self.temperature <= 0:
            raise ConfigError("--num_samples > 1 needs --temperature > 0 (greedy solutions are all the same)")
        if self.verifier_ckpt_dir and self.num_samples < 2:
            raise ConfigError(
                "--verifier_ckpt_dir picks the best of several solutions per question: pass --temperature > 0 "
                f"and --num_samples 2 or more (got {self.num_samples})"
            )
        if self.generation_engine not in ("auto", "static"):
            raise ConfigError(
                f"--generation_engine must be auto or static (the TP model has no Hugging Face generate), "
                f"got {self.generation_engine!r}"
            )


def cut_at_stop(text: str, stops: list[str]) -> str:
    """``text`` up to (not including) the first stop string."""
    ends = [text.find(s) for s in stops if s in text]
    return text[: min(ends)] if ends else text


def solve(
    model,
    tokenizer,
    prompts: list[str],
    args: SolverEvaluateArguments,
    dev: torch.device,
    log: SolutionLog | None = None,
) -> tuple[list[str], int]:
    """Generated continuations (decoded, special tokens skipped) in the order of ``prompts``, and how many
    of them this call generated.

    The rollout engine continues each prompt until EOS (allowed from the first token), a ``--stop`` string
    or ``--max_gen_len`` tokens; greedy at ``--temperature 0``, else sampled (``--top_p``) from a generator
    seeded with ``--seed`` and the batch's number, so a run's solutions do not depend on what ran before
    it. With a ``log`` (:mod:`rlhf.tp.solution_log`), batches an interrupted run finished are read back
    instead of generated, and each new batch is recorded as it ends.
    """
    stops = split_comma_list(args.stop) if args.stop else []
    ids = [encode_prompt_text(p, tokenizer) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths batch together
    sampling = SamplingConfig(
        max_new_tokens=args.max_gen_len, min_new_tokens=0, temperature=args.temperature, top_p=args.top_p,
        eos_token_id=stop_ids(tokenizer.eos_token_id, generation_eos_ids(args.ckpt_dir)),
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    rng = torch.Generator(dev)
    generator = build_generator(
        args.generation_engine, lambda: nullcontext(model), sampling,
        max_prompt_length=max(len(i) for i in ids), generator=rng,
        max_batch_size=min(args.max_batch_size, len(ids)),  # the KV cache: no rows for prompts that are not there
    )  # fmt: skip
    done = log.load() if log is not None else {}

    def stop_fn(row: int, tokens: list[int]) -> bool:
        return any(s in tokenizer.decode(tokens, skip_special_tokens=True) for s in stops)

    outputs: list[str] = [""] * len(ids)
    n_batches, generated = math.ceil(len(ids) / args.max_batch_size), 0
    progress = tqdm(total=len(ids), desc="solver_evaluate", unit="solution", disable=not is_main())
    for b in range(n_batches):
        chunk = order[b * args.max_batch_size : (b + 1) * args.max_batch_size]
        progress.set_postfix_str(f"batch {b + 1}/{n_batches}", refresh=False)
        if all(i in done for i in chunk):  # finished by an interrupted run of this command
            for i in chunk:
                outputs[i] = done[i]
            progress.update(len(chunk))
            continue
        seeded(rng, args.seed, b)
        prompt_ids, prompt_mask = left_pad([ids[i] for i in chunk], tokenizer.pad_token_id)
        out = generator.generate(prompt_ids, prompt_mask, stop=stop_fn if stops else None)
        lengths = out.response_mask.sum(1).tolist()  # through the EOS, or up to where a stop string ended it
        for i, row, n in zip(chunk, out.response_ids.tolist(), lengths):
            outputs[i] = cut_at_stop(tokenizer.decode(row[:n], skip_special_tokens=True), stops)
        generated += len(chunk)
        if log is not None:
            log.append({i: outputs[i] for i in chunk})
        progress.update(len(chunk))
    progress.close()
    return outputs, generated


def score(
    rows: list[dict], outputs: list[str], prompts: list[str], num_samples: int
) -> tuple[list[dict], dict]:
    """Prediction rows (question-major, then sample) and metrics; ``accuracy`` is the mean of ``correct``."""
    predictions, majority_correct = [], []
    for q, row in enumerate(rows):
        votes = Counter()
        for s in range(num_samples):
            output = outputs[q * num_samples + s]
            prediction = extract_prediction(output)
            record = {
                "question": row["question"],
                "prompt": prompts[q],
                "output": output,
                "prediction": prediction or "",
                "label": row["label"],
                "correct": answers_match(prediction, row["label"]),
            }
            if num_samples > 1:
                record["sample"] = s
            predictions.append(record)
            if prediction is not None:
                votes[prediction] += 1
        majority = votes.most_common(1)[0][0] if votes else None
        majority_correct.append(answers_match(majority, row["label"]))
    n = len(predictions)
    metrics = {"accuracy": sum(r["correct"] for r in predictions) / n, "n": n, "n_questions": len(rows)}
    if num_samples > 1:
        metrics["majority_vote_accuracy"] = sum(majority_correct) / len(rows)
    return predictions, metrics


def best_of_n(predictions: list[dict], scores: list[float], num_samples: int) -> float:
    """Store each sample's ``verifier_score``; the share of questions whose best-scored sample is correct."""
    best_correct = []
    for q in range(0, len(predictions), num_samples):
        group = predictions[q : q + num_samples]
        for row, value in zip(group, scores[q : q + num_samples]):
            row["verifier_score"] = value
        best_correct.append(max(group, key=lambda r: r["verifier_score"])["correct"])
    return sum(best_correct) / len(best_correct)


def rank_with_verifier(
    args: SolverEvaluateArguments, predictions: list[dict], rank: int, world_size: int, dev: torch.device
) -> float:
    """Best-of-N accuracy of ``predictions`` under the verifier in ``--verifier_ckpt_dir``."""
    from rlhf.tp.verifier import score_solutions

    tokenizer = load_tokenizer(args.verifier_ckpt_dir, trust_remote_code=args.trust_remote_code)
    verifier = load_tp_model(
        args.verifier_ckpt_dir, rank=rank, world_size=world_size, device=dev,
        dtype=resolve_tp_dtype(args.dtype, dev), scalar_head=True,
    ).eval()  # fmt: skip
    pairs = [(p["question"], p["output"]) for p in predictions]
    return best_of_n(
        predictions, score_solutions(verifier, tokenizer, pairs, args.max_batch_size), args.num_samples
    )


def write_outputs(
    log_dir: Path, predictions: list[dict], metrics: dict, greedy: list[dict] | None = None
) -> None:
    """predictions.jsonl, metrics.json (and greedy_predictions.jsonl), each written to a temp file and renamed."""
    log_dir.mkdir(parents=True, exist_ok=True)
    files = [("predictions.jsonl", predictions)] + ([("greedy_predictions.jsonl", greedy)] if greedy else [])
    texts = [(name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)) for name, rows in files]
    for name, text in texts + [("metrics.json", json.dumps(metrics, indent=2) + "\n")]:
        write_text_atomic(log_dir / name, text)


def evaluate(args: SolverEvaluateArguments) -> dict:
    args.validate()
    rows = list(load_dataset_dir(args.label_file, "gsm8k"))[: args.limit]
    rank, world_size = init_model_parallel()
    check_checkpoint(args.ckpt_dir, world_size, model_type=args.model_type)  # now, not after a generation
    if args.verifier_ckpt_dir:
        check_verifier_dir(args.verifier_ckpt_dir, world_size)
    dev = device()
    tokenizer = load_tokenizer(
        args.peft_path or args.ckpt_dir, trust_remote_code=args.trust_remote_code, padding_side="left"
    )
    model = load_tp_model(
        args.ckpt_dir,
        rank=rank,
        world_size=world_size,
        device=dev,
        dtype=resolve_tp_dtype(args.dtype, dev),
        model_type=args.model_type,
        peft_path=args.peft_path,
    ).eval()
    prompts = [gsm8k_prompt(row["question"]) for row in rows]
    settings = {k: v for k, v in asdict(args).items() if k not in ("log_dir",)}
    run = {"world_size": world_size, "dtype": str(next(model.parameters()).dtype)}
    samples_log = solution_log(args, "samples", run)
    started = time.perf_counter()
    samples = [p for p in prompts for _ in range(args.num_samples)]
    outputs, generated = solve(model, tokenizer, samples, args, dev, samples_log)
    seconds = time.perf_counter() - started
    predictions, metrics = score(rows, outputs, prompts, args.num_samples)
    greedy, logs = None, [samples_log]
    if args.verifier_ckpt_dir:
        greedy_args = replace(args, temperature=0.0, num_samples=1)
        logs.append(solution_log(greedy_args, "greedy", run))
        greedy_outputs, _ = solve(model, tokenizer, prompts, greedy_args, dev, logs[-1])
        greedy, greedy_metrics = score(rows, greedy_outputs, prompts, 1)
        metrics["greedy_accuracy"] = greedy_metrics["accuracy"]
        del model  # the verifier takes its place in memory
        metrics["best_of_n_accuracy"] = rank_with_verifier(args, predictions, rank, world_size, dev)
    if generated:  # the questions whose solutions this run generated, per second of generation
        metrics["questions_per_second"] = generated / args.num_samples / seconds
    metrics.update(tensor_parallel=world_size, settings=settings)
    if is_main():
        write_outputs(Path(args.log_dir), predictions, metrics, greedy)
        logger.info(
            "GSM8K accuracy %.4f over %d solutions -> %s", metrics["accuracy"], metrics["n"], args.log_dir
        )
    for log in logs:
        log.remove()
    barrier()
    return metrics


def solution_log(args: SolverEvaluateArguments, name: str, run: dict) -> SolutionLog:
    """The partial-solutions file of one generation pass (``samples``, or ``greedy`` with a verifier), keyed
    by everything that decides its solutions: the flags, ``run`` (TP degree, dtype) and the size and time of
    the model, adapter and label files (a model retrained into the same dir is another model)."""
    settings = {k: v for k, v in asdict(args).items() if k not in ("log_dir", "verifier_ckpt_dir")}
    settings |= run | {
        f"{flag}_signature": files_signature(getattr(args, flag))
        for flag in ("ckpt_dir", "peft_path", "label_file")
    }
    path = Path(args.log_dir) / f".solutions-{name}.partial.jsonl"
    return SolutionLog(path, {**settings, "pass": name}, is_main())


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    (args,) = parse_args((SolverEvaluateArguments,), argv)
    with process_group_scope():
        return evaluate(args)


if __name__ == "__main__":
    main()
