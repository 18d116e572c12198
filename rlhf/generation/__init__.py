"""The generation seam: the PPO loop asks a :class:`Generator` for responses and never calls
``model.generate`` itself, so a faster engine can replace Hugging Face generation without touching it.

:class:`HFGenerator` is imported on first use, so code that never uses it (the tensor-parallel PPO)
does not load the Hugging Face generation path."""

from rlhf.generation.base import Generation, Generator, SamplingConfig, response_mask_after_eos

__all__ = ["Generation", "Generator", "HFGenerator", "SamplingConfig", "response_mask_after_eos"]


def __getattr__(name: str):
    if name == "HFGenerator":
        from rlhf.generation.hf import HFGenerator

        return HFGenerator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
