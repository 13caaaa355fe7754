"""rlhf_toy: SFT -> reward model -> hand-written PPO (and DPO), small enough for a laptop CPU.

Foundations: `config` (dataclass configs, `--config x.yaml` plus flags), `data` (TRL-format datasets),
`models` (embedded, tiny and local models), `task` (the toy task and its gold judge), `sequences`
(prompts, sampling, EOS, log-probs), `scoring` (reward model, PPO's score, the judge), `runlog`
(run directories). Then `stages/`, `evaluation/` and `verify/`.
"""

import ctypes
import os
import sys


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next allocation instead of handing it back to the kernel.

    PyTorch's CPU tensors come from malloc, and glibc serves each one above a few MB (a batch's logits, the KV
    cache, activations) with its own mmap, which free() returns to the kernel: the next step's tensor of the same
    size page-faults in freshly zeroed pages all over again. On a 2-core CPU that was a fifth of PPO's time
    (configs/ppo.yaml, 4 steps, bf16: 7.5 M page faults, 22-32 s of kernel time, 67-75 s wall; with this 1.3 M,
    7-11 s, 55-58 s) and the demo ran 1.18x faster, with the same numbers to the last digit and about 1.1 GB more at
    its peak (docs/performance.md). Linux with glibc only. A user's own MALLOC_* or GLIBC_TUNABLES setting wins
    (nothing is changed). Returns whether the setting was made."""
    if not sys.platform.startswith("linux") or "GLIBC_TUNABLES" in os.environ:
        return False
    if any(name.startswith("MALLOC_") for name in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no libc.so.6)
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    # no allocation mmapped (all from the heap, reused after free), and the heap's free top kept up to 2 GB
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


keep_freed_memory()
