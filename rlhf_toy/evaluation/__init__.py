"""Judging what the models say: `sample_and_score` (the one sampling + scoring path every stage and compare
use), `stats` (summaries, win rates), `compare` (runs side by side), `report` (markdown, plots, HTML) and
`inspect_samples` (reading the answers)."""
