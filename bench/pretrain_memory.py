"""Peak memory of reading ``--pretrain_dataset_dir`` text into PPO's pretraining blocks, on CPU.

    python bench/pretrain_memory.py [--sizes-mb 5 40] [--results FILE]

For each size, one ``*.txt`` file of that many MB (one document per line: the HH transcripts of
``../shared/data`` when present, else the repository's ``pt_data`` lines, repeated) is read by
:func:`rlhf.data.load_pretrain_blocks` in a fresh process, with the benchmark tokenizer
(:func:`bench.harness.build_bench_model`) and ``--block_size 512``, two ways:

- ``rows``: this checkout, the file read in rows of whole lines (``TEXT_ROW_CHARS``, 256 KB) tokenized a
  few rows at a time, the token stream read back from ``datasets``' cache as one array;
- ``one row per file``: the same code with the whole file as one row, tokenized in one call, as the loader
  did before e9e9de6 (which then also grouped the blocks in Python lists and built the tensor from them, so
  it used more than this row shows).

Reported: the process's peak RSS, the part of it above the RSS after the imports, and the seconds; written
to the ``pretrain-memory-cpu`` section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import HH_PAIRS, build_bench_model, has_shared_data, run_worker  # noqa: E402
from bench.results_file import markdown_table, update_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"rows": "rows (this checkout)", "file": "one row per file (as before e9e9de6)"}


def corpus_lines() -> list[str]:
    """One document per line: the HH transcripts (newlines folded), else the repository's pt_data lines."""
    if has_shared_data():
        with gzip.open(HH_PAIRS, "rt") as f:
            return [" ".join(json.loads(line)["chosen"].split()) for line in f]
    lines = []
    for path in sorted((ROOT / "pt_data").glob("*.txt")):
        lines += [line for line in path.read_text().splitlines() if line.strip()]
    return lines


def write_text(directory: Path, megabytes: float) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lines, size, out = corpus_lines(), 0, []
    while size < megabytes * 2**20:
        for line in lines:
            out.append(line)
            size += len(line.encode()) + 1
            if size >= megabytes * 2**20:
                break
    (directory / "corpus.txt").write_text("\n".join(out) + "\n")
    return directory


def rss_mb() -> float:
    """Peak RSS so far (VmHWM on Linux: not the driver's peak, which ``ru_maxrss`` inherits)."""
    from rlhf.ppo.memory import peak_rss_gb

    return peak_rss_gb() * 1024


def worker(variant: str, workdir: Path, text_dir: str, model_dir: str) -> None:
    from transformers import AutoTokenizer

    import rlhf.data.loading as loading
    import rlhf.data.pretrain as pretrain

    if variant == "file":
        loading.TEXT_ROW_CHARS, pretrain.TOKENIZE_ROWS = 10**15, 1000
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    before = rss_mb()
    start = time.perf_counter()
    blocks = pretrain.load_pretrain_blocks(text_dir, tokenizer, 512, str(workdir / "cache"))
    seconds = time.perf_counter() - start
    result = {"name": variant, "blocks": int(blocks.shape[0]), "peak_rss_mb": rss_mb(),
              "above_imports_mb": rss_mb() - before, "seconds": seconds}  # fmt: skip
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help="internal: one variant")
    parser.add_argument("--workdir")
    parser.add_argument("--text")
    parser.add_argument("--model")
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[5.0, 40.0])
    parser.add_argument(
        "--results", type=Path, default=None, help="write the section here (default RESULTS.md)"
    )
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, Path(args.workdir), args.text, args.model)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_bench_model(Path(tmp) / "model")
        for megabytes in args.sizes_mb:
            text = write_text(Path(tmp) / f"text{megabytes:g}", megabytes)
            for variant, label in VARIANTS.items():
                workdir = Path(tmp) / f"run-{variant}-{megabytes:g}"
                workdir.mkdir()
                result = run_worker(
                    __file__, variant, workdir, extra=("--text", str(text), "--model", str(model))
                )
                print(json.dumps({"megabytes": megabytes, **result}), flush=True)
                if "error" in result:
                    rows.append([f"{megabytes:g}", label, "failed: " + result["error"], "", "", ""])
                    continue
                rows.append([
                    f"{megabytes:g}", label, result["blocks"], f"{result['peak_rss_mb']:,.0f}",
                    f"{result['above_imports_mb']:,.0f}", f"{result['seconds']:.1f}",
                ])  # fmt: skip
    source = (
        "HH-RLHF chosen transcripts (../shared/data)" if has_shared_data() else "the repository's pt_data"
    )
    section = (
        "## Pretraining text into blocks: peak memory, CPU (`bench/pretrain_memory.py`)\n\n"
        f"One `*.txt` file of the given size (one document per line: {source}, repeated), read by "
        "`load_pretrain_blocks` with the benchmark tokenizer and `--block_size 512` in a fresh process each, "
        f"torch threads 1, {os.uname().machine}. `rows`: this checkout (rows of whole lines, about 256 KB, "
        "tokenized a few at a time, the stream read back from the cache as one array). `one row per file`: the "
        "same code with each file as one row tokenized in one call, as before e9e9de6, which then also grouped "
        "the blocks in Python lists (more memory than this row shows). RSS above imports: peak minus the RSS "
        "after importing and loading the tokenizer.\n\n"
        + markdown_table(
            ["text MB", "reading", "blocks", "peak RSS MB", "RSS above imports MB", "seconds"], rows
        )
    )
    update_section("pretrain-memory-cpu", section, args.results or Path(__file__).parent / "RESULTS.md")
    print(section)


if __name__ == "__main__":
    main()
