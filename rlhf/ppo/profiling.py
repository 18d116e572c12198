"""``--profile_step N``: one optimizer step of the PPO loop under ``torch.profiler``, to see where its time
goes (the rollout's generation and forwards, the update's matmuls, attention and memory-bound passes).

The step's work (its rollout when that step collects one, its mini-batches and the optimizer step) runs
under the profiler on the main process; it then writes, under ``--output_dir``:

- ``profile/step_N.json``: the Chrome trace (open it in https://ui.perfetto.dev or ``chrome://tracing``),
  with the loop's phases labelled ``ppo/rollout``, ``ppo/mini_batch`` and ``ppo/optimizer_step``;
- ``profile/step_N.txt``: the device time by kind of kernel (matmul, attention, the rest: the memory-bound
  passes) and the top operators by self time, on the GPU when there is one, else on the CPU.

The profiled step runs slower than the others (the profiler's own cost): leave it out of timings.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from rlhf.errors import ConfigError

logger = logging.getLogger(__name__)

KINDS = {  # substrings of kernel / operator names, lower case, checked in this order
    "attention": ("flash", "fmha", "attention", "attn"),
    "matmul": (
        "gemm",
        "matmul",
        "aten::mm",
        "aten::bmm",
        "aten::addmm",
        "cutlass",
        "xmma",
        "nvjet",
        "cublas",
    ),
}


def kind_of(name: str) -> str:
    """``attention``, ``matmul`` or ``other`` (elementwise, reductions, copies: the memory-bound passes)."""
    lowered = name.lower()
    for kind, marks in KINDS.items():
        if any(mark in lowered for mark in marks):
            return kind
    return "other"


def check_profile_step(step: int) -> None:
    """``--profile_step`` up front: a step number, or 0 for none."""
    if step < 0:
        raise ConfigError(f"--profile_step must be >= 0 (0: no profile), got {step}")


class StepProfiler:
    """Profiles optimizer step ``step`` (0: none) on the main process; see the module docstring. A step
    outside this run's ``first_step..last_step`` (done before a resume, or past ``--max_steps``) is said in
    one warning."""

    def __init__(
        self,
        step: int,
        output_dir: str | Path,
        device: torch.device,
        is_main: bool,
        first_step: int,
        last_step: int,
    ) -> None:
        self.step, self.dir, self.device = step, Path(output_dir) / "profile", device
        self.enabled = step > 0 and is_main
        self._profile: profile | None = None
        if self.enabled and not first_step <= step <= last_step:
            logger.warning(
                "--profile_step %d: this run does optimizer steps %d to %d, so no step is profiled",
                step, first_step, last_step,
            )  # fmt: skip

    def before(self, next_step: int) -> None:
        """Called before each mini-batch's work (and its rollout) that counts toward ``next_step``."""
        if self.enabled and next_step == self.step and self._profile is None:
            activities = [ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self._profile = profile(activities=activities)
            self._profile.__enter__()

    def after(self, done_step: int) -> None:
        """Called after each optimizer step: writes the files once ``step`` is done."""
        if self._profile is None or done_step != self.step:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._profile.__exit__(None, None, None)
        prof, self._profile, self.enabled = self._profile, None, False
        self.dir.mkdir(parents=True, exist_ok=True)
        trace, summary = self.dir / f"step_{self.step}.json", self.dir / f"step_{self.step}.txt"
        prof.export_chrome_trace(str(trace))
        summary.write_text(summarize(prof, self.device.type == "cuda"))
        logger.info("profile of optimizer step %d: %s (trace: %s)", self.step, summary, trace)


def summarize(prof: profile, on_gpu: bool) -> str:
    """Device time by kind of kernel, then the top operators by self time."""
    events = prof.key_averages()
    if on_gpu:
        timed = [
            (e.name, e.device_time) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and not _annotation(e)
        ]  # fmt: skip
        unit, sort_by = "GPU kernel time", "self_device_time_total"
    else:  # operators, not the loop's labels
        timed = [(e.key, e.self_cpu_time_total) for e in events if e.key.startswith("aten::")]
        unit, sort_by = "CPU self time of operators", "self_cpu_time_total"
    totals: dict[str, float] = {}
    for name, time_us in timed:
        totals[kind_of(name)] = totals.get(kind_of(name), 0.0) + time_us
    whole = sum(totals.values()) or 1.0
    lines = [f"{unit} by kind (ms, share):"]
    for kind in ("matmul", "attention", "other"):
        lines.append(
            f"  {kind:<10} {totals.get(kind, 0.0) / 1e3:10.1f}  {totals.get(kind, 0.0) / whole:6.1%}"
        )
    lines += ["", events.table(sort_by=sort_by, row_limit=30)]
    return "\n".join(lines) + "\n"


def _annotation(event) -> bool:
    """A label (the loop's ``ppo/...`` ranges, on the GPU timeline too), not a kernel."""
    return event.name.startswith("ppo/") or bool(getattr(event, "is_user_annotation", False))
