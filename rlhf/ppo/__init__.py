"""PPO: the RL math as pure tensor functions, the rollout buffer, the models interface and the loop."""
