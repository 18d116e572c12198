"""rlhf: supervised fine-tuning, reward modelling and PPO on the Hugging Face stack.

Stages live in sub-packages named by noun (``rlhf.data``, ``rlhf.models``, ``rlhf.sft``, ``rlhf.rm``,
``rlhf.ppo``, ``rlhf.tp``); the thin entry scripts at the repository root call into them.
"""

__version__ = "0.1.0"
