"""The gold judge against hand-written (good, bad) answer pairs, per kind of junk (tests/adversarial/)."""

from __future__ import annotations

import json
from collections import defaultdict

from rlhf_toy import task


def read_pairs(path) -> list[dict]:
    """One pair a line: kind, title, prompt, good, bad."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def ordered_by_kind(pairs: list[dict], judge=task) -> dict[str, list[bool]]:
    """Per kind, for each pair, whether the judge scores the good answer strictly above the bad one."""
    out = defaultdict(list)
    for pair in pairs:
        good, bad = (judge.gold_score(pair[side], pair["title"]) for side in ("good", "bad"))
        out[pair["kind"]].append(good > bad)
    return dict(out)


def shares(table: dict[str, list[bool]]) -> dict[str, float]:
    """Per kind, the share of pairs ordered; the ordinary pairs last."""
    return {
        kind: sum(table[kind]) / len(table[kind])
        for kind in sorted(table, key=lambda k: (k == "ordinary", k))
    }
