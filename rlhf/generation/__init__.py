"""The generation seam: the PPO loop asks a :class:`Generator` for responses and never calls
``model.generate`` itself. Two generators implement it: :class:`HFGenerator` (Hugging Face ``generate``)
and :class:`EngineGenerator` (the rollout engine: static KV cache, on-device sampling, CUDA graphs on GPU,
one decode-step interface for HF and tensor-parallel models); :func:`build_generator` picks one for
``--generation_engine {auto,hf,static}``."""

from rlhf.generation.base import Generation, Generator, SamplingConfig, response_mask_after_eos
from rlhf.generation.build import build_generator
from rlhf.generation.engine import EngineGenerator, RolloutEngine

__all__ = [
    "EngineGenerator",
    "Generation",
    "Generator",
    "HFGenerator",
    "RolloutEngine",
    "SamplingConfig",
    "build_generator",
    "response_mask_after_eos",
]


def __getattr__(name: str):
    """``HFGenerator`` is imported on first use, so code that never uses it (the tensor-parallel PPO)
    does not load the Hugging Face generation path."""
    if name == "HFGenerator":
        from rlhf.generation.hf import HFGenerator

        return HFGenerator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
