"""The overoptimisation study's fits and plot from a compare report (`make overopt`).

    python scripts/overopt.py reports/overopt [--split eval] [--samples 12]

Writes overopt.md, overopt.json and overopt.png beside the report's compare.json.
"""

from rlhf_toy.evaluation.overopt import main

if __name__ == "__main__":
    main()
