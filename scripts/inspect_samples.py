"""Show prompts with each run's responses and their gold, RM and length-penalty scores.

python scripts/inspect_samples.py reports/NAME [--sort disagreement] [--grep TEXT] [--id N ...] [--limit N]
"""

from rlhf_toy.evaluation.inspect_samples import main

if __name__ == "__main__":
    main()
