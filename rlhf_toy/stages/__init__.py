"""The pipeline's stages, one module each: `sft`, `reward` (the reward model), `ppo/` (hand-written),
`dpo`; `common` holds what the TRL-based stages share (run set-up, LoRA, precision, the final model)."""
