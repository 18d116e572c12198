"""Data preparation at scale, CPU: reading data files and the tokenization cache, this checkout against another.

    python bench/data_loading.py --compare DIR [--rows 200000] [--list-rows 20000] [--results FILE]

``DIR`` is another checkout of this repository (e.g. ``git archive <commit> | tar -x -C DIR``). Each
workload runs in a fresh process for each checkout, one thread:

- ``jsonl``: ``load_dataset_dir`` on one ``.jsonl`` file of ``--rows`` SFT rows (GSM8K train questions and
  answers when ``../shared/data`` is present, else the repository's ``sft_data``, repeated), each answer
  with one emoji: a string holding a non-ASCII character takes 4 bytes per character in Python;
- ``json list``: the same rows, ``--list-rows`` of them, as one ``.json`` list;
- ``cache re-run``: ``tokenize_sft_dataset`` on the ``jsonl`` rows a second time, with the tokenizer
  loaded again from a copy of its dir with ``padding_side="left"`` (what another stage or a copied output
  dir does): the seconds show whether ``datasets``' cache was hit.

Reported: seconds and the process's peak RSS (VmHWM); written to the ``data-loading-cpu`` section of
``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import GSM8K_TRAIN, build_bench_model, has_shared_data, run_worker  # noqa: E402
from bench.results_file import markdown_table, update_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("jsonl", "json list", "cache re-run")


def source_rows() -> list[dict[str, str]]:
    if has_shared_data():
        rows = [json.loads(line) for line in GSM8K_TRAIN.read_text().splitlines() if line.strip()]
        return [{"instruction": r["question"], "output": r["answer"]} for r in rows]
    rows = []
    for path in sorted((ROOT / "sft_data").glob("*.json*")):
        text = path.read_text()
        rows += (
            json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x]
        )
    return rows


def write_data(directory: Path, rows: int, list_rows: int) -> tuple[Path, Path]:
    base = source_rows()
    records = []
    for i in range(rows):
        row = dict(base[i % len(base)])
        row["output"] = f"{row['output']} 🙂 ({i})"
        records.append(row)
    (directory / "jsonl").mkdir(parents=True)
    (directory / "list").mkdir()
    lines = "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n"
    (directory / "jsonl" / "rows.jsonl").write_text(lines)
    (directory / "list" / "rows.json").write_text(
        json.dumps(records[:list_rows], ensure_ascii=False, indent=1)
    )
    return directory / "jsonl", directory / "list"


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def worker(workload: str, workdir: Path, code: str, data: str, model: str) -> None:
    sys.path.insert(0, code)  # this checkout's or the compared one's rlhf package
    from rlhf.data.loading import load_dataset_dir
    from rlhf.models import load_tokenizer
    from rlhf.sft.examples import tokenize_sft_dataset

    cache = str(workdir / "cache")
    if workload == "cache re-run":
        tokenize_sft_dataset(load_dataset_dir(data, "sft", cache), load_tokenizer(model), 512)
        copy = workdir / "tokenizer-copy"
        shutil.copytree(model, copy)
        tokenizer = load_tokenizer(str(copy), padding_side="left")
        start = time.perf_counter()
        tokenize_sft_dataset(load_dataset_dir(data, "sft", cache), tokenizer, 512)
    else:
        start = time.perf_counter()
        load_dataset_dir(data, "sft", cache)
    seconds = time.perf_counter() - start
    print(json.dumps({"name": workload, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help="internal: one workload")
    parser.add_argument("--workdir")
    parser.add_argument("--code")
    parser.add_argument("--data")
    parser.add_argument("--model")
    parser.add_argument("--compare", required=False, help="another checkout to measure beside this one")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--list-rows", type=int, default=20_000)
    parser.add_argument(
        "--results", type=Path, default=None, help="write the section here (default RESULTS.md)"
    )
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, Path(args.workdir), args.code, args.data, args.model)
        return
    checkouts = {"this checkout": str(ROOT)}
    if args.compare:
        checkouts[f"compared ({Path(args.compare).name})"] = str(Path(args.compare).resolve())
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_bench_model(Path(tmp) / "model")
        jsonl, listed = write_data(Path(tmp) / "data", args.rows, args.list_rows)
        megabytes = (jsonl / "rows.jsonl").stat().st_size / 2**20
        for workload in WORKLOADS:
            for label, code in checkouts.items():
                workdir = Path(tmp) / f"run-{len(table)}"
                workdir.mkdir()
                data = str(listed if workload == "json list" else jsonl)
                extra = ("--code", code, "--data", data, "--model", str(model))
                result = run_worker(__file__, workload, workdir, timeout=1800, extra=extra)
                print(json.dumps({"checkout": label, **result}), flush=True)
                rows = args.list_rows if workload == "json list" else args.rows
                if "error" in result:
                    table.append([workload, f"{rows:,}", label, "failed: " + result["error"], ""])
                else:
                    seconds, peak = f"{result['seconds']:.1f}", f"{result['peak_rss_mb']:,.0f}"
                    table.append([workload, f"{rows:,}", label, seconds, peak])
    source = "GSM8K train rows (../shared/data)" if has_shared_data() else "the repository's sft_data rows"
    section = (
        "## Data preparation at scale, CPU (`bench/data_loading.py`)\n\n"
        f"SFT rows from {source}, repeated, one emoji in each answer; the `.jsonl` file is {megabytes:.0f} MB. "
        "`jsonl` and `json list`: `load_dataset_dir` (parse and validate into Arrow) on a first run; "
        "`cache re-run`: `tokenize_sft_dataset` again on the same rows with the tokenizer loaded from a copy of "
        f'its dir with `padding_side="left"` (seconds of that second call). One process per row, one thread, '
        f"{os.uname().machine}; peak = the process's VmHWM.\n\n"
        + markdown_table(["workload", "rows", "code", "seconds", "peak RSS MB"], table)
    )
    update_section("data-loading-cpu", section, args.results or Path(__file__).parent / "RESULTS.md")
    print(section)


if __name__ == "__main__":
    main()
