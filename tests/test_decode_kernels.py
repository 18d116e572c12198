"""bench/decode_kernels.py's count: the kernels one decode step runs (what a CUDA graph replays), for the
adapter unmerged and merged. The merged copy exists to cut them; this keeps that true as the code changes."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_merged_copy_decodes_with_far_fewer_kernels_per_layer():
    sys.path.insert(0, str(REPO / "bench"))
    from decode_kernels import count

    for bf16 in (False, True):
        unmerged = count(4, merged=False, bf16=bf16) - count(2, merged=False, bf16=bf16)
        merged = count(4, merged=True, bf16=bf16) - count(2, merged=True, bf16=bf16)
        assert 0 < merged < 0.7 * unmerged, (bf16, merged / 2, unmerged / 2)  # 26 vs 46, 30 vs 50 per layer


def test_our_lora_forward_saves_six_kernels_per_projection_under_autocast():
    """Under autocast PEFT casts a bf16 input to the float32 adapter's dtype and back, casts both adapter
    matrices to bf16 (at every step of a CUDA graph, captured without autocast's weight-cast cache), and
    scales and adds the adapter's output: 6 kernels for each of the 7 adapted projections of a layer that
    our forward (as every stage builds its adapters) and the engine's bf16 copies of the adapters do not run."""
    sys.path.insert(0, str(REPO / "bench"))
    from decode_kernels import count

    def per_layer(fast_forward: bool) -> int:
        return (count(4, False, True, fast_forward) - count(2, False, True, fast_forward)) // 2

    # 92 -> 50 per layer with peft 0.21 (6 per projection); another peft version may differ by a few
    assert per_layer(False) - per_layer(True) >= 4 * 7
