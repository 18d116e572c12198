"""``make bench``: run every benchmark script in this folder, one after the other."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHES = [
    "sft.py",
    "rm.py",
    "ppo.py",
    "rollout.py",
    "decode_kernels.py",
    "lora_traffic.py",
    "host_syncs.py",
    "pretrain_memory.py",
    "data_loading.py",
]


def main() -> int:
    here = Path(__file__).resolve().parent
    failed = []
    for name in BENCHES:
        script = here / name
        if not script.exists():
            continue
        print(f"== {name}", flush=True)
        if subprocess.run([sys.executable, str(script)], cwd=here.parent).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
