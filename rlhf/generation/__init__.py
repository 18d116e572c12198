"""The generation seam: the PPO loop asks a :class:`Generator` for responses and never calls
``model.generate`` itself, so a faster engine can replace Hugging Face generation without touching it."""

from rlhf.generation.base import Generation, Generator, SamplingConfig, response_mask_after_eos
from rlhf.generation.hf import HFGenerator

__all__ = ["Generation", "Generator", "HFGenerator", "SamplingConfig", "response_mask_after_eos"]
