"""Generation throughput of the TP backend (TP=1, ``rlhf.tp.generation``) against Hugging Face ``generate``.

``python bench/tp.py`` needs a GPU: TinyLlama-1.1B-shaped random-init model in bf16, the same GSM8K prompts
(``../shared/data/gsm8k/test.jsonl`` when present, else synthetic questions), the same batch size, greedy,
exactly ``--max_gen_len`` new tokens each (EOS ignored on both sides, so both do the same work). It writes
the ``tp`` section of ``bench/RESULTS.md``. Without CUDA it says so and exits 0, unless ``--cpu`` asks
for a small-model CPU run (printed, labelled CPU, not written).

questions/s = prompts completed per second of the timed batches (the first batch is warm-up).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from results_file import markdown_table, update_section  # noqa: E402

IMPLS = ["rlhf-tp", "hf-generate"]
GSM8K = harness.ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def questions(n: int) -> list[str]:
    from rlhf.tp.prompt import gsm8k_prompt

    if GSM8K.is_file():
        rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:n]]
        return [gsm8k_prompt(r["question"]) for r in rows]
    return [gsm8k_prompt(f"Tom has {i} apples and buys {i + 3} more. How many apples?") for i in range(n)]


def worker(name: str, workdir: Path, batch_size: int, n_batches: int, max_gen_len: int) -> dict:
    import torch
    from transformers import AutoTokenizer

    model_dir = workdir / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    prompts = questions(batch_size * (n_batches + 1))
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    dtype = torch.bfloat16 if harness.on_gpu() else torch.float32
    if name == "rlhf-tp":
        from rlhf.tp.distributed import device, init_model_parallel
        from rlhf.tp.generation import generate
        from rlhf.tp.loading import load_tp_model

        init_model_parallel()
        model = load_tp_model(str(model_dir), rank=0, world_size=1, device=device(), dtype=dtype).eval()

        def run(batch: list[str]) -> None:
            ids = [tokenizer(p)["input_ids"] for p in batch]
            generate(model, ids, max_gen_len=max_gen_len, eos_id=None, pad_id=tokenizer.pad_token_id)
    else:
        from transformers import AutoModelForCausalLM

        dev = "cuda" if harness.on_gpu() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(dev).eval()

        def run(batch: list[str]) -> None:
            enc = tokenizer(batch, return_tensors="pt", padding=True).to(dev)
            with torch.no_grad():
                model.generate(
                    **enc, max_new_tokens=max_gen_len, min_new_tokens=max_gen_len, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )  # fmt: skip

    def sync() -> None:
        if harness.on_gpu():
            torch.cuda.synchronize()

    run(batches[0])  # warm-up
    sync()
    started = time.perf_counter()
    for batch in batches[1:]:
        run(batch)
    sync()
    seconds = time.perf_counter() - started
    n = batch_size * n_batches
    return {
        "name": name,
        "questions_per_s": n / seconds,
        "new_tokens_per_s": n * max_gen_len / seconds,
        "peak_memory_mb": harness.peak_memory_mb(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=IMPLS)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--cpu", action="store_true", help="run without a GPU on a small model (not written)")
    args = parser.parse_args()
    gpu = harness.on_gpu()
    batch_size, n_batches, max_gen_len = (64, 3, 256) if gpu else (8, 2, 32)
    if args.worker:
        harness.report(worker(args.worker, args.workdir, batch_size, n_batches, max_gen_len))
        return 0
    if not gpu and not args.cpu:
        print("bench/tp.py: no CUDA device; this benchmark needs a GPU (pass --cpu for a small CPU run)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        harness.build_bench_model(workdir / "model")
        results = [harness.run_worker(__file__, name, workdir) for name in IMPLS]
    header = ["implementation", "questions/s", "new tokens/s", "peak memory MB", "vs hf-generate"]
    base = next((r for r in results if r["name"] == "hf-generate" and "error" not in r), None)
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["name"], "error: " + r["error"], "", "", ""])
            continue
        ratio = f"{r['questions_per_s'] / base['questions_per_s']:.2f}x" if base else ""
        rows.append(
            [
                r["name"],
                f"{r['questions_per_s']:.2f}",
                f"{r['new_tokens_per_s']:.0f}",
                f"{r['peak_memory_mb']:.0f}",
                ratio,
            ]
        )
    where = "GPU, TinyLlama-1.1B shape, bf16" if gpu else "CPU, small llama (hidden 256, 4 layers), fp32"
    table = markdown_table(header, rows)
    text = (
        f"## TP generation (solver_evaluate engine, TP=1) vs HF generate\n\n{where}; batch {batch_size}, "
        f"{n_batches} timed batches, greedy, exactly {max_gen_len} new tokens per question.\n\n{table}\n"
    )
    print(text)
    if gpu:
        update_section("tp", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
