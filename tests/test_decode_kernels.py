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
        assert 0 < merged < 0.6 * unmerged, (bf16, merged / 2, unmerged / 2)  # 28 vs 64, 32 vs 82 per layer


def test_our_lora_forward_saves_four_kernels_per_projection_under_autocast():
    """PEFT casts a bf16 input to the float32 adapter's dtype, autocast casts it back, and the adapter's output
    is scaled and added: 4 kernels for each of the 7 adapted projections of a layer that our forward (as every
    stage builds its adapters) does not run."""
    sys.path.insert(0, str(REPO / "bench"))
    from decode_kernels import count

    def per_layer(fast_forward: bool) -> int:
        return (count(4, False, True, fast_forward) - count(2, False, True, fast_forward)) // 2

    assert per_layer(False) - per_layer(True) == 4 * 7  # 96 -> 68 per layer
