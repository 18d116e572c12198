"""Stage 2, the reward model: Bradley-Terry pairwise loss on a one-output sequence classifier."""

from rlhf.reward.losses import pairwise_accuracy, pairwise_loss
from rlhf.reward.model import last_token_index, load_reward_model, sequence_rewards
from rlhf.reward.pairs import PairCollator, clean_pairs, tokenize_pair_row, tokenize_pairs
from rlhf.reward.stage import RewardArguments, RewardDataArguments, run_reward

__all__ = [
    "PairCollator",
    "RewardArguments",
    "RewardDataArguments",
    "clean_pairs",
    "last_token_index",
    "load_reward_model",
    "pairwise_accuracy",
    "pairwise_loss",
    "run_reward",
    "sequence_rewards",
    "tokenize_pair_row",
    "tokenize_pairs",
]
