"""Seed spread from a compare report of several training seeds per method (`make study`).

    python scripts/study_summary.py reports/study [--split test]

Writes study.md and study.json beside the report's compare.json.
"""

from rlhf_toy.evaluation.study import main

if __name__ == "__main__":
    main()
