"""``make demo``: the tiny end-to-end pipeline on the built-in toy task (stages are added as they land)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rlhf.logging_setup import setup_logging
from rlhf.tiny import build_tiny_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="where the demo writes models and its report")
    args = parser.parse_args(argv)
    setup_logging()
    out = Path(args.out)
    start = time.time()
    base = build_tiny_model("llama", out / "base")
    summary = {"base_model": str(base), "wall_seconds": round(time.time() - start, 2)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
