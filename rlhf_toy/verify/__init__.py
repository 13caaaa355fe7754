"""Checks that the project is right, kept apart from the product: the numeric cross-check against TRL's
own `PPOTrainer` (`trl_numeric`), the run-level cross-check and benchmark helpers (`trl_run`), and the
seed's bandit and GridWorld solved by the same PPO loss functions (`toy_rl`)."""
