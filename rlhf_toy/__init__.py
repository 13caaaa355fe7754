"""rlhf_toy: SFT -> reward model -> hand-written PPO (and DPO), small enough for a laptop CPU."""
