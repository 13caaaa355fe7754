"""Compare runs on the same prompts with the same seeds and the same judges.

    python scripts/compare.py --runs runs/sft runs/ppo runs/dpo base --ref runs/sft \
        --prompts data/prompts_eval.jsonl data/prompts_test.jsonl --output_dir reports/NAME [--limit N]

Writes compare.json, compare.md, frontier.png, curves.png, report.html and samples/ (see --help).
"""

from rlhf_toy.evaluation.compare import main

if __name__ == "__main__":
    main()
