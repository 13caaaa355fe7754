"""rlhf_toy: SFT -> reward model -> hand-written PPO (and DPO), small enough for a laptop CPU.

Foundations: `config` (dataclass configs, `--config x.yaml` plus flags), `data` (TRL-format datasets),
`models` (embedded, tiny and local models), `task` (the toy task and its gold judge), `sequences`
(prompts, sampling, EOS, log-probs), `scoring` (reward model, PPO's score, the judge), `runlog`
(run directories). Then `stages/`, `evaluation/` and `verify/`.
"""
