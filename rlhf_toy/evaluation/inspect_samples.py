"""Read what the models actually say: prompts with each run's responses and their scores.

    python scripts/inspect_samples.py reports/NAME                  # a compare report (its samples/)
    python scripts/inspect_samples.py runs/ppo runs/dpo             # runs' own samples.jsonl (latest step)
    python scripts/inspect_samples.py reports/NAME --sort disagreement --limit 10
    python scripts/inspect_samples.py reports/NAME --grep "Iron Meadow" --id 3 7
    python scripts/inspect_samples.py --prompt 'Review "Jaws" in one sentence.' base runs/sft runs/ppo runs/dpo
    python scripts/inspect_samples.py --prompt 'Review "Jaws" in one sentence.' runs/ppo --tokens --ref runs/sft

Sorting by reward-gold disagreement finds reward hacking: a response the reward model scores far
above what the gold judge (the simulated human) thinks of it. Both are z-scored over the samples
shown, and a prompt's disagreement is the largest z(RM) − z(gold) among its responses.
(Named inspect_samples, not inspect, so it does not shadow the standard library's `inspect`.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import textwrap
from pathlib import Path

from rlhf_toy import runlog
from rlhf_toy.config import DTYPES, positive_float


class InspectError(ValueError):
    pass


def _prompt_text(prompt) -> str:
    if isinstance(prompt, list):
        return "\n".join(m.get("content", "") for m in prompt if m.get("role") != "system")
    return str(prompt)


def _num(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _normalise(row: dict, label: str) -> dict:
    return {
        "label": label,
        "prompt": _prompt_text(row.get("prompt", "")),
        "response": str(row.get("response", "")),
        "gold": _num(row.get("gold")),
        "rm": _num(row.get("rm")),
        "score": _num(row.get("score")),
        "length_penalty": _num(row.get("length_penalty")),
        "kl": _num(row.get("kl")),
        "n_tokens": row.get("n_tokens"),
        "has_eos": row.get("has_eos"),
        "prompt_id": row.get("prompt_id"),
        "sample": row.get("sample") or 0,
        "tokens": row.get("tokens") or _view_rows(row.get("token_view")),
        "rewards": {k: _num(v) for k, v in _dict(row.get("rewards")).items()},
    }


def _view_rows(view) -> list[dict] | None:
    """A stored per-token view (columns: {"token": [...], "k1": [...], ...}) as one dict per token."""
    if not isinstance(view, dict) or not isinstance(view.get("token"), list):
        return None
    return [
        {name: view[name][t] for name in view if isinstance(view[name], list) and t < len(view[name])}
        for t in range(len(view["token"]))
    ]


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _latest(rows: list[dict]) -> list[dict]:
    """A run's samples.jsonl holds several moments (PPO: every few steps; SFT/DPO: before, after): the last."""
    if any("step" in r for r in rows):
        last = max(r.get("step", -1) for r in rows)
        return [r for r in rows if r.get("step", -1) == last]
    if any("stage" in r for r in rows):
        last = rows[-1].get("stage")
        return [r for r in rows if r.get("stage") == last]
    return rows


def _read(path: Path) -> list[dict]:
    try:
        return runlog.read_jsonl(path)
    except json.JSONDecodeError as error:
        raise InspectError(f"{path}: not valid JSON lines ({error.msg})") from None


def load_samples(sources: list[str], include_checkpoints: bool = False) -> list[dict]:
    """Rows from compare reports, run directories or samples .jsonl files, in a common shape."""
    rows = []
    for source in sources:
        path = Path(source)
        if (path / "samples").is_dir():  # a compare report
            report = path / "compare.json"
            wanted = list(json.loads(report.read_text())["runs"]) if report.exists() else None
            metas = {
                json.loads(m.read_text())["label"]: m.with_name(m.name.replace(".meta.json", ".jsonl"))
                for m in sorted((path / "samples").glob("*.meta.json"))
            }
            labels = [
                name
                for name in metas
                if wanted is None or name in wanted or (include_checkpoints and "@" in name)
            ]
            if wanted:
                labels.sort(
                    key=lambda name: (
                        wanted.index(name.split("@")[0]) if name.split("@")[0] in wanted else 99,
                        name,
                    )
                )
            for label in labels:
                rows += [_normalise(r, label) for r in _read(metas[label])]
        elif (path / "samples.jsonl").exists():  # a run directory
            rows += [_normalise(r, path.name) for r in _latest(_read(path / "samples.jsonl"))]
        elif path.suffix == ".jsonl" and path.exists():
            rows += [_normalise(r, r.get("label", path.stem)) for r in _latest(_read(path))]
        else:
            raise InspectError(
                f"{source}: no samples here (expected a compare report with samples/, a run "
                "directory with samples.jsonl, or a .jsonl file)"
            )
    if not rows:
        raise InspectError("no samples in " + ", ".join(sources))
    return rows


def quoted_title(prompt: str) -> str | None:
    """The film a typed prompt asks about: its first "quoted" part, as the task's templates write it."""
    import re

    match = re.search(r'"([^"]+)"', prompt)
    return match.group(1) if match else None


def sample_prompt(args) -> list[dict]:
    """Each run (compare's `--runs` forms: a run or model directory, a model name, `base`) answers the typed
    prompt `--samples` times, scored by the gold judge and, when there is one, the reward model."""
    # torch and the models load only for a typed prompt: reading a run's samples stays instant
    from rlhf_toy import models, sequences
    from rlhf_toy.evaluation.compare import CompareError, load_model_and_tokenizer, resolve_entries
    from rlhf_toy.evaluation.sample_and_score import Sampling, sample_and_score
    from rlhf_toy.scoring import Judge

    title = args.title or quoted_title(args.prompt)
    precision = models.resolve_precision(args.dtype, models.pick_device("auto"))
    try:
        judge = Judge(args.reward_model, dtype=precision.name)
    except models.ModelNotFoundError as error:  # a causal LM given as --reward_model, among others
        raise InspectError(str(error)) from None
    if judge.note:
        print(f"note: {judge.note}", file=sys.stderr)

    def load(spec):
        try:
            entry = resolve_entries(spec, args.base or models.DEFAULT_MODEL, 0)[0]
            if entry.best_of:
                raise InspectError(f"{spec}: --prompt samples models; best-of-N lives in compare")
            return entry, *load_model_and_tokenizer(entry.model, entry.tokenizer_from, "auto", precision.name)
        except (CompareError, models.ModelNotFoundError) as error:
            raise InspectError(str(error)) from None

    ref = ref_tokenizer = None
    if args.tokens:
        if not args.ref:
            raise InspectError(
                "--tokens measures each token against a reference: name it with --ref (e.g. runs/sft)"
            )
        _, ref, ref_tokenizer = load(args.ref)
    prompt = [{"role": "user", "content": args.prompt}]
    rows = []
    for spec in args.sources:
        entry, model, tokenizer = load(spec)
        if args.tokens and models.tokenizer_difference(tokenizer, ref_tokenizer) is not None:
            raise InspectError(
                f"--tokens: {spec} and --ref {args.ref} have different tokenizers, so no token of one "
                "is a token of the other"
            )
        _, scored = sample_and_score(
            model,
            tokenizer,
            [prompt] * args.samples,
            Sampling(
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                batch_size=args.samples,
                seed=args.seed,
                precision=precision,
            ),
            titles=[title] * args.samples,
            judge=judge,
            ref=ref,
            ref_tokenizer=ref_tokenizer,
            keep_ids=args.tokens,
        )
        for row in scored if args.tokens else ():
            row["tokens"] = sequences.token_view(
                model,
                ref,
                tokenizer,
                prompt,
                row["response_ids"],
                temperature=args.temperature,
                precision=precision,
            )
        rows += [
            _normalise({**row, "prompt_id": 0, "sample": j}, entry.label) for j, row in enumerate(scored)
        ]
    return rows


def group_by_prompt(rows: list[dict]) -> list[dict]:
    """One entry per prompt text, ids in order of first appearance (a compare report's own ids when it has them)."""
    groups: dict = {}
    for row in rows:
        group = groups.setdefault(
            row["prompt"], {"prompt": row["prompt"], "rows": [], "id": row["prompt_id"]}
        )
        group["rows"].append(row)
    for i, group in enumerate(groups.values()):
        if group["id"] is None:
            group["id"] = i
    return list(groups.values())


def add_disagreement(groups: list[dict]) -> bool:
    """z(RM) − z(gold) per response and its maximum per prompt; False when there are no RM scores."""
    scored = [r for g in groups for r in g["rows"] if r["rm"] is not None and r["gold"] is not None]
    if len(scored) < 2:
        return False

    def z(key):
        values = [r[key] for r in scored]
        mean, std = statistics.mean(values), statistics.pstdev(values) or 1.0
        return lambda v: (v - mean) / std

    z_rm, z_gold = z("rm"), z("gold")
    for group in groups:
        for r in group["rows"]:
            r["disagreement"] = z_rm(r["rm"]) - z_gold(r["gold"]) if r in scored else None
        values = [r["disagreement"] for r in group["rows"] if r["disagreement"] is not None]
        group["disagreement"] = max(values) if values else -math.inf
    return True


class Style:
    CODES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "cyan": "36"}

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, text: str, *names) -> str:
        if not self.enabled or not names or not text:
            return text
        return "\033[" + ";".join(self.CODES[n] for n in names) + "m" + text + "\033[0m"

    def score(self, value, fmt="+.2f") -> str:
        if value is None:
            return "—"
        colour = "green" if value > 0.3 else "red" if value < -0.3 else None
        return self(format(value, fmt), *([colour] if colour else []))


# The per-token columns a view may have, in order, with their headings: sampling now (--prompt) measures log π,
# log π_ref, k1 and the exact KL; compare's stored samples hold k1; PPO's training samples add what the update used.
TOKEN_HEADINGS = {
    "logp": "log π",
    "ref_logp": "log π_ref",
    "k1": "k1",
    "exact_kl": "exact KL",
    "advantage": "advantage",
    "value": "value",
    "ratio": "ratio",
    "reward": "reward",
}


def token_table(tokens: list[dict], indent: str, style: Style) -> list[str]:
    """An answer's tokens one per line with the columns its view has (`TOKEN_HEADINGS`: k1 = log π − log π_ref,
    the KL penalty PPO's reward pays on it; in PPO's training samples also the advantage, the value, the ratio
    π/π_old at the update and the per-token reward, the score on the last token); the tokens the policy moved
    most (|k1| > 1 nat) stand out; the sums of k1 and the exact KL at the end."""
    columns = [name for name in TOKEN_HEADINGS if name in tokens[0]]
    lines = [indent + style(f"{'token':<16}" + "".join(f"{TOKEN_HEADINGS[c]:>11}" for c in columns), "dim")]
    for t in tokens:
        row = f"{t['token']!r:<16}" + "".join(
            f"{t[c]:>+11.3f}" if c == "k1" else f"{t[c]:>11.3f}" for c in columns
        )
        lines.append(indent + (style(row, "yellow") if abs(t.get("k1", 0.0)) > 1 else row))
    totals = {c: sum(t[c] for t in tokens) for c in ("k1", "exact_kl") if c in columns}
    lines.append(
        indent
        + style(
            f"{'sum':<16}"
            + "".join(
                (f"{totals[c]:>+11.3f}" if c == "k1" else f"{totals[c]:>11.3f}") if c in totals else " " * 11
                for c in columns
            ),
            "dim",
        )
    )
    return lines


def render(groups: list[dict], width: int, style: Style, show_tokens: bool = False) -> str:
    out = []
    label_width = min(16, max(len(r["label"]) + (2 if r["sample"] else 0) for g in groups for r in g["rows"]))
    indent = " " * (label_width + 4)
    for group in groups:
        head = f"#{group['id']}  "
        disagreement = group.get("disagreement")
        tail = (
            f"  (RM−gold disagreement {disagreement:+.2f})" if disagreement not in (None, -math.inf) else ""
        )
        # Wrap the prompt with its tail, then colour the pieces (escape codes must not count as width).
        lines = textwrap.wrap(group["prompt"] + tail, width=max(20, width - len(head)))
        out.append(style("━" * min(width, 100), "dim"))
        for i, line in enumerate(lines):
            cut = line.find(tail.strip()) if tail and tail.strip() in line else len(line)
            out.append(
                (style(head, "bold", "cyan") if i == 0 else " " * len(head))
                + style(line[:cut], "bold")
                + style(line[cut:], "yellow")
            )
        for r in group["rows"]:
            parts = [f"gold {style.score(r['gold'])}", f"RM {style.score(r['rm'])}"]
            if r["length_penalty"] is not None:
                parts.append(f"len-pen {r['length_penalty']:.2f}")
            if r["score"] is not None:
                parts.append(f"score {r['score']:+.2f}")
            if r["kl"] is not None:
                parts.append(f"KL {r['kl']:.2f}")
            if r["n_tokens"] is not None:
                parts.append(f"{r['n_tokens']} tok" + ("" if r["has_eos"] in (True, None) else " no EOS"))
            # reward functions (compare --rewards, PPO's samples): a verifiable check's verdict beside gold
            parts += [
                f"{name} {value:g}"
                for name, value in r["rewards"].items()
                if name != "rm" and value is not None
            ]
            if r.get("disagreement") is not None and r["disagreement"] > 1.5:
                parts.append(style("RM ≫ gold", "yellow", "bold"))
            suffix = f"#{r['sample']}" if r["sample"] else ""  # the j-th sample of a prompt
            name = r["label"][: label_width - len(suffix)] + suffix
            out.append(f"  {style(name.ljust(label_width), 'bold')}  " + "  ".join(parts))
            text = r["response"] or "(empty)"
            out.append(
                textwrap.fill(
                    text,
                    width=width,
                    initial_indent=indent,
                    subsequent_indent=indent,
                    break_long_words=True,
                    replace_whitespace=True,
                )
            )
            if show_tokens and r.get("tokens"):
                out += token_table(r["tokens"], indent, style)
        out.append("")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "sources",
        nargs="+",
        help="compare reports, run directories or samples .jsonl files; with "
        "--prompt: the runs to sample (run or model directories, model names, `base`)",
    )
    p.add_argument("--prompt", help="sample each run on this prompt now, instead of reading stored samples")
    p.add_argument(
        "--title",
        help="with --prompt: the film, for gold's on-topic term (default: the prompt's "
        'first "quoted" part; none: no on-topic term)',
    )
    p.add_argument("--samples", type=int, default=2, help="with --prompt: answers per run")
    p.add_argument("--temperature", type=positive_float, default=0.7)
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--reward_model",
        default="runs/reward/final",
        help="with --prompt: the RM that scores (`none`: gold only)",
    )
    p.add_argument(
        "--tokens",
        action="store_true",
        help="each answer token by token. With --prompt, against --ref: "
        "log π, log π_ref, their difference k1 (the KL penalty PPO's reward pays on it) and the exact KL "
        "over the whole vocabulary at that position. Stored samples: their k1 (compare) and, in PPO's "
        "training samples, the advantage, value, ratio at the update and per-token reward",
    )
    p.add_argument(
        "--ref", help="with --tokens: the reference model (a run, a model directory or name, `base`)"
    )
    p.add_argument(
        "--base", default=None, help="with --prompt: the model `base` stands for (default: the embedded one)"
    )
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--grep", help="only prompts whose text contains this (case-insensitive)")
    p.add_argument("--id", type=int, nargs="+", help="only these prompt ids")
    p.add_argument("--runs", nargs="+", help="only these run labels")
    p.add_argument(
        "--sort",
        choices=("id", "disagreement", "gold", "rm"),
        default="id",
        help="disagreement: RM far above gold first; gold: worst gold first; rm: highest RM first",
    )
    p.add_argument("--limit", type=int, default=0, help="show at most N prompts (0 = all)")
    p.add_argument("--checkpoints", action="store_true", help="include a compare report's checkpoint samples")
    p.add_argument("--width", type=int, default=0, help="text width (default: the terminal's, at most 110)")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    return p


def run_inspect(args, stream=None) -> str:
    stream = stream or sys.stdout
    if args.prompt is not None:
        if not args.prompt.strip() or args.samples < 1:
            raise InspectError("--prompt needs some text and --samples at least 1")
        rows = sample_prompt(args)
    else:
        rows = load_samples(args.sources, args.checkpoints)
    if args.runs:
        rows = [r for r in rows if r["label"] in args.runs]
    groups = group_by_prompt(rows)
    has_rm = add_disagreement(groups)
    if args.grep:
        groups = [g for g in groups if args.grep.lower() in g["prompt"].lower()]
    if args.id:
        groups = [g for g in groups if g["id"] in set(args.id)]
    if args.sort == "disagreement":
        if not has_rm:
            raise InspectError(
                "these samples have no RM scores, so there is no reward-gold disagreement to sort by "
                "(run compare.py with --reward_model)"
            )
        groups.sort(key=lambda g: -g["disagreement"])
    elif args.sort == "gold":
        groups.sort(
            key=lambda g: min((r["gold"] for r in g["rows"] if r["gold"] is not None), default=math.inf)
        )
    elif args.sort == "rm":
        groups.sort(
            key=lambda g: -max((r["rm"] for r in g["rows"] if r["rm"] is not None), default=-math.inf)
        )
    if args.limit:
        groups = groups[: args.limit]
    if not groups:
        raise InspectError("no prompt matches the filters")
    width = args.width or min(110, shutil.get_terminal_size((100, 24)).columns)
    colour = args.color == "always" or (
        args.color == "auto" and stream.isatty() and not os.environ.get("NO_COLOR")
    )
    text = render(groups, width, Style(colour), show_tokens=args.tokens)
    print(text, file=stream)
    return text


def main(argv=None) -> str:
    args = build_parser().parse_args(argv)
    try:
        return run_inspect(args)
    except InspectError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
        raise SystemExit(2) from None
    except BrokenPipeError:  # `| head`
        sys.stderr.close()
        return ""
