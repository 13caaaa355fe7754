"""pass@k of models on an RLVR task's eval prompts (n answers each, the unbiased estimator).

    python scripts/pass_at_k.py --config configs/rlvr.yaml --models sft=runs/sft grpo=runs/variants/rlvr/grpo \
        --n 16 --k 1 4 16 --output reports/variants/rlvr_pass_at_k.md
"""

from rlhf_toy.evaluation.pass_at_k import main

if __name__ == "__main__":
    main()
