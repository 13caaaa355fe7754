"""Stage 3, PPO written by hand: `core` (the math, pure functions), `config`, `models`, `checkpoint`,
and `trainer` (the loop)."""
