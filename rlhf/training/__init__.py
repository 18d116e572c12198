"""What the Trainer-based stages (SFT, reward model) share: trainable-weight set-up and output handling."""

from rlhf.training.guard import FiniteLossMixin, NonFiniteLossError
from rlhf.training.outputs import AtomicCheckpointMixin, prepare_output_dir, save_final_model
from rlhf.training.trainable import count_parameters, make_trainable, weights_dtype

__all__ = [
    "AtomicCheckpointMixin",
    "FiniteLossMixin",
    "NonFiniteLossError",
    "count_parameters",
    "make_trainable",
    "prepare_output_dir",
    "save_final_model",
    "weights_dtype",
]
