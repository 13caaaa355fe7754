"""Evaluation: every run answers the same prompts with the same sampling seeds, judged the same way.

    python scripts/compare.py --runs runs/sft runs/ppo runs/dpo base --ref runs/sft \
        --prompts data/prompts_eval.jsonl data/prompts_test.jsonl --output_dir reports/NAME [--limit N]

A run is a run directory (its `final/` model, and its kept checkpoints as extra points on the
gold-vs-KL plot), a model directory, a model name (`tiny-random-gpt2`, `embedded:...`), or `base`
(the `--base` model). `LABEL=PATH` names a run explicitly.

Per run, over the samples (one or more per prompt):
- gold_mean: the gold judge (the simulated human), the number that matters.
- rm_mean: the reward model's normalised score (null without a reward model); score_mean also
  subtracts the length and missing-EOS penalties PPO optimises.
- kl_to_ref: sequence KL(π‖π_ref) estimated on π's samples, Σ_t log π(y_t|·) − log π_ref(y_t|·) over
  response tokens, both log-probs taken at the sampling temperature (logits / T), so it is the KL
  between the two distributions the samples actually come from (as TRL's PPO computes its KL).
- win_rate_vs_ref: P(gold of the run's answer > gold of the reference's answer to the same prompt),
  ties count half, with a 95% percentile-bootstrap interval over prompts.
- length_mean (response tokens, EOS included), eos_rate, distinct_2 (distinct word bigrams / all
  word bigrams over all responses: words, so runs with different tokenizers are comparable).
- rewards/<name>/mean: with `--rewards module:function ...` (PPO's reward functions, TRL's signature), each
  function's mean, and every pair's difference in it (a verifiable task's success rate: configs/rlvr.yaml).

Sampling is batched and resumable: each model's scored samples go to `samples/KEY.jsonl` one batch at
a time, so a killed compare continues where it stopped. Every batch has its own seed, which is the
same for every model (common random numbers): a model compared with itself gives identical samples,
win rate 0.5 and KL 0 exactly.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_toy import data, models, runlog
from rlhf_toy.config import DTYPES, ConfigError, check_device, positive_float
from rlhf_toy.evaluation.report import (
    compare_markdown,
    fmt,
    last_training_samples,
    markdown_table,
    plot_frontier,
    plot_training_curves,
    write_html,
)
from rlhf_toy.evaluation.sample_and_score import Sampling, sample_and_score
from rlhf_toy.evaluation.stats import MIN_BOOTSTRAP, paired_comparison, summarize
from rlhf_toy.rewards import RewardFunctionError, load_reward_functions
from rlhf_toy.scoring import PENALTIES_OFF, Judge, has_reward_model, reward_model_dir, run_penalties

DEFAULT_REWARD_MODEL = "runs/reward/final"
BASE = "base"


class CompareError(ValueError):
    """Bad compare input (a run with no model, a bad prompts file); the message says what to do."""


# ----------------------------------------------------------------------------------------------
# Finding the models
# ----------------------------------------------------------------------------------------------
@dataclass
class Entry:
    """One model to sample: a run's final model, one of its checkpoints, or a plain model."""

    label: str  # what tables and plots call it ("ppo", "ppo@step-40")
    model: str  # a loadable model directory or name
    run: str  # the label of the run it belongs to
    run_dir: Path | None = None
    step: int | None = None  # a checkpoint's training step; None for the final model
    tokenizer_from: str | None = None  # where to load the tokenizer from, when `model` has none
    best_of: int = 0  # > 0: best-of-N of the reference's samples by the reward model (`bon:N`)

    @property
    def key(self) -> str:
        return samples_key(self.label)


def samples_key(label: str) -> str:
    """The name of a label's samples file in compare's samples/ (KEY.jsonl)."""
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", label)


def checkpoints_of(run_dir: Path) -> list[tuple[int, Path]]:
    """A run's kept checkpoints that hold a model, as (step, model directory): an HF trainer's
    `checkpoint-N/` (full or LoRA adapter) or the PPO stage's `step-N/policy/`."""
    found = []
    for step, path in runlog.checkpoints(run_dir / "checkpoints"):
        model_dir = path / "policy" if (path / "policy").is_dir() else path
        if models.is_model_dir(model_dir):
            found.append((step, model_dir))
    return found


def _last_logged_step(run_dir: Path) -> int | None:
    steps = [
        r["step"] for r in runlog.read_jsonl(run_dir / "metrics.jsonl") if isinstance(r.get("step"), int)
    ]
    return max(steps) if steps else None


def resolve_entries(spec: str, base: str, max_checkpoints: int) -> list[Entry]:
    """A `--runs` item as the models to sample: the final model first, then kept checkpoints."""
    label, _, target = spec.partition("=") if "=" in spec else ("", "", spec)
    if target.startswith("bon:"):
        n = target.removeprefix("bon:")
        if not n.isdigit() or int(n) < 1:
            raise CompareError(f"--runs {spec}: best-of-N is bon:N with N a positive integer (bon:4, bon:16)")
        return [Entry(label or target, "", label or target, best_of=int(n))]  # the model: the reference's
    if target == BASE:
        return [Entry(label or BASE, base, label or BASE)]
    path = Path(target).expanduser()
    if path.is_dir() and not models.is_model_dir(path):
        run_label = label or path.name
        final = path / "final"
        ckpts = checkpoints_of(path)
        if not models.is_model_dir(final) and not ckpts:
            raise CompareError(
                f"run directory {path} holds no model: no final/ and no checkpoints/ with a model in them "
                "(did its training finish? a model directory has a config.json)"
            )
        entries = []
        if models.is_model_dir(final):
            entries.append(Entry(run_label, str(final), run_label, path))
            last = _last_logged_step(path)
            if ckpts and last is not None and ckpts[-1][0] >= last:
                ckpts = ckpts[
                    :-1
                ]  # the last checkpoint holds the final weights: no need to sample them twice
        else:
            step, ckpt = ckpts.pop()  # an unfinished run: its newest checkpoint stands in for final/
            print(f"note: {path} has no final/; using its newest checkpoint (step {step})", file=sys.stderr)
            entries.append(Entry(run_label, str(ckpt), run_label, path, step, _tokenizer_dir(path, ckpt)))
        if max_checkpoints > 0 and ckpts:
            picks = sorted(
                {round(i * (len(ckpts) - 1) / max(1, max_checkpoints - 1)) for i in range(max_checkpoints)}
            )
            for step, ckpt in (ckpts[i] for i in picks if i < len(ckpts)):
                entries.append(
                    Entry(f"{run_label}@{step}", str(ckpt), run_label, path, step, _tokenizer_dir(path, ckpt))
                )
        return entries
    if path.is_dir():
        name = path.parent.name if path.name == "final" else path.name
        return [Entry(label or name, str(path), label or name, _owning_run_dir(path))]
    try:
        models.resolve_model_path(target)  # a model name (tiny-random-gpt2, embedded:..., a hub id)
    except models.ModelNotFoundError as error:
        raise CompareError(f"--runs {spec}: {error}") from None
    return [Entry(label or target, target, label or target)]


def _owning_run_dir(model_dir: Path) -> Path | None:
    """The run directory a model directory is part of (its final/, or a model in its checkpoints/),
    so a run used through a checkpoint keeps its run's penalties and curves; None for a plain model."""
    for run_dir in list(model_dir.parents)[:3]:
        part = model_dir.relative_to(run_dir).parts[0]
        if part in ("final", "checkpoints") and (run_dir / "config.yaml").exists():
            return run_dir
    return None


def _tokenizer_dir(run_dir: Path, model_dir: Path) -> str | None:
    for candidate in (model_dir, model_dir.parent, run_dir / "final"):
        if (candidate / "tokenizer_config.json").exists():
            return str(candidate)
    return None


def load_model_and_tokenizer(entry_model: str, tokenizer_from: str | None, device: str, dtype: str):
    """A causal LM (a LoRA adapter directory is merged into its base) and its prepared tokenizer."""
    from transformers import AutoTokenizer

    source = tokenizer_from or entry_model
    if Path(source).is_dir() and (Path(source) / "tokenizer_config.json").exists():
        # A checkpoint directory may hold a tokenizer and a LoRA adapter but no config.json.
        tokenizer = models.prepare_tokenizer(AutoTokenizer.from_pretrained(source))
    else:
        tokenizer = models.load_tokenizer(source)
    model = models.load_causal_lm(entry_model, tokenizer, device, dtype)  # an adapter is merged into its base
    model.eval()
    return model, tokenizer


def tokenizer_mismatch(tokenizer, ref_tokenizer) -> str | None:
    """Why a token-level KL between two models is undefined, or None when they share a tokenizer."""
    difference = models.tokenizer_difference(tokenizer, ref_tokenizer)
    if difference is None:
        return None
    return (
        f"its tokenizer differs from the reference's ({difference.replace('the first', 'the run')}): a "
        "per-token KL needs one token space, so kl_to_ref is left out for it. Use a --ref that shares its "
        "tokenizer (e.g. the model it was trained from)."
    )


# ----------------------------------------------------------------------------------------------
# Sampling, batch by batch, resumable
# ----------------------------------------------------------------------------------------------
def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_stamp(model: str) -> dict:
    """Identifies a model's weights on this machine (names, sizes, modification times): a retrained run
    invalidates its cached samples. It lives in samples/*.meta.json, which git ignores: a fresh clone
    has committed samples but no stamps, so it samples every model again rather than trust them."""
    path = Path(model)
    if not path.is_dir():
        return {"name": model}
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    return {
        "path": str(path.resolve()),
        "files": [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files],
    }


def _read_done(path: Path, batch_sizes: list[int]) -> list[dict]:
    """The rows of complete batches (a kill can leave a half-written last line or batch)."""
    rows = runlog.read_jsonl(path)
    total = 0
    for size in batch_sizes:
        if total + size > len(rows):
            break
        total += size
    return rows[:total]


def sample_entry(
    entry: Entry,
    prompts,
    titles,
    *,
    ref,
    judge: Judge,
    args,
    out_dir: Path,
    ref_key: str,
    precision: models.Precision,
    records: list[dict],
    reward_functions: list,
) -> list[dict]:
    """Sample and score one model on every prompt (each `samples_per_prompt` times), resuming."""
    samples_dir = out_dir / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    path, meta_path = samples_dir / f"{entry.key}.jsonl", samples_dir / f"{entry.key}.meta.json"
    settings = {
        k: getattr(args, k)
        for k in (
            "max_new_tokens",
            "temperature",
            "seed",
            "batch_size",
            "samples_per_prompt",
            "max_prompt_length",
            "dtype",
        )
    }
    if args.rewards:  # only then: samples compared without reward functions keep their stamp
        settings["rewards"] = args.rewards
    meta = {
        "label": entry.label,
        "model": entry.model,
        "run": entry.run,
        "step": entry.step,
        "fingerprint": _fingerprint(
            [
                _model_stamp(entry.model),
                settings,
                prompts,
                titles,
                ref_key,
                judge.penalties,
                getattr(judge, "path", None),
            ]
        ),
    }
    batches = [
        (j, start)
        for j in range(args.samples_per_prompt)
        for start in range(0, len(prompts), args.batch_size)
    ]
    sizes = [len(prompts[start : start + args.batch_size]) for _, start in batches]
    old_meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if old_meta is None or old_meta.get("fingerprint") != meta["fingerprint"]:
        if path.exists():
            print(
                f"{entry.label}: model, prompts or settings changed since the last compare (or were never "
                "recorded here); resampling",
                file=sys.stderr,
            )
        path.unlink(missing_ok=True)
    meta_path.write_text(json.dumps(meta) + "\n")
    rows = _read_done(path, sizes)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    n_done = sum(1 for i in range(len(batches)) if sum(sizes[: i + 1]) <= len(rows))
    if n_done == len(batches):
        return rows

    ref_model, ref_tokenizer, ref_model_name = ref
    is_ref = entry.model == ref_model_name
    if is_ref:
        model, tokenizer = ref_model, ref_tokenizer
    else:
        model, tokenizer = load_model_and_tokenizer(
            entry.model, entry.tokenizer_from, args.device, args.dtype
        )
    mismatch = None if is_ref else tokenizer_mismatch(tokenizer, ref_tokenizer)
    if mismatch:
        print(f"warning: {entry.label}: {mismatch}", file=sys.stderr)
    from tqdm.auto import tqdm

    for j, start in tqdm(
        batches[n_done:], desc=f"sampling {entry.label}", unit="batch", initial=n_done, total=len(batches)
    ):
        batch, batch_titles = (
            prompts[start : start + args.batch_size],
            titles[start : start + args.batch_size],
        )
        # The batch's seed depends only on (seed, sample index, batch start): the same for every model.
        seed = args.seed * 1_000_003 + j * 10_007 + start
        # The reference itself has KL 0 by definition; a run with another tokenizer has no token-level KL.
        _, scored = sample_and_score(
            model,
            tokenizer,
            batch,
            Sampling(
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                batch_size=len(batch),
                seed=seed,
                max_prompt_length=args.max_prompt_length,
                precision=precision,
            ),
            titles=batch_titles,
            judge=judge,
            ref=None if is_ref or mismatch else ref_model,
            ref_tokenizer=ref_tokenizer,
            records=records[start : start + args.batch_size],
            reward_functions=reward_functions,
        )
        new = [
            {
                "prompt_id": start + i,
                "sample": j,
                "label": entry.label,
                **row,
                **({"kl": 0.0} if is_ref else {}),
                **({"kl_note": mismatch} if mismatch else {}),
            }
            for i, row in enumerate(scored)
        ]
        runlog.append_jsonl(path, new)
        rows.extend(new)
    if not is_ref:
        del model
    return rows


def best_of_n_rows(entry: Entry, candidates: list[dict], samples_per_prompt: int) -> list[dict]:
    """Best-of-N (`bon:N`): for each prompt (and sample j), of the reference's candidates j·N … j·N+N−1 the one
    the reward model scores highest. Its KL to the reference is the analytic log N − (N−1)/N (Stiennon et
    al. 2020, appendix; Gao et al. 2022), an upper bound that is tight when the top score is unique."""
    n = entry.best_of
    kl = math.log(n) - (n - 1) / n
    by_key = {(r["prompt_id"], r["sample"]): r for r in candidates}
    rows = []
    for prompt_id in sorted({r["prompt_id"] for r in candidates}):
        for j in range(samples_per_prompt):
            group = [by_key[(prompt_id, j * n + c)] for c in range(n)]
            best = max(group, key=lambda r: r["rm"])  # the first of equals: deterministic
            rows.append({**best, "sample": j, "label": entry.label, "kl": kl, "candidate": best["sample"]})
    return rows


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported as the one line `error: ...` (exit 2) every stage prints."""

    def error(self, message):
        print(f"error: {message} (--help lists the arguments)", file=sys.stderr)
        raise SystemExit(2)


def _int_at_least(minimum: int):
    """An argparse type: an int >= minimum."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return convert


def _device(text: str) -> str:
    try:
        return check_device(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--runs",
        nargs="+",
        required=True,
        help="run directories, model directories or names, or `base`; LABEL=PATH names one",
    )
    p.add_argument("--ref", default=None, help="the reference for KL and win rate (default: the first run)")
    p.add_argument("--base", default=models.DEFAULT_MODEL, help="the model `base` stands for")
    p.add_argument(
        "--prompts",
        nargs="+",
        default=["data/prompts_eval.jsonl"],
        help="prompt files, each a split named after it (prompts_test.jsonl: test); the tables up "
        "front are the last file's, then each file's and all pooled",
    )
    p.add_argument("--output_dir", required=True)
    p.add_argument(
        "--limit", type=_int_at_least(0), default=0, help="use the first N prompts of each file (0 = all)"
    )
    p.add_argument("--reward_model", default=DEFAULT_REWARD_MODEL, help="reward model directory, or `none`")
    p.add_argument(
        "--rewards",
        nargs="+",
        default=[],
        metavar="MODULE:FUNCTION",
        help="reward functions (PPO's `rewards` entries) to score every answer with, from the prompt records' columns",
    )
    p.add_argument(
        "--length_coef", type=float, default=None, help="default: from a PPO run's config.yaml, else 0"
    )
    p.add_argument("--length_target", type=int, default=None)
    p.add_argument("--missing_eos_penalty", type=float, default=None)
    p.add_argument("--max_new_tokens", type=_int_at_least(1), default=48)
    p.add_argument("--temperature", type=positive_float, default=0.7)
    p.add_argument("--samples_per_prompt", type=_int_at_least(1), default=1)
    p.add_argument("--batch_size", type=_int_at_least(1), default=16)
    p.add_argument("--max_prompt_length", type=_int_at_least(1), default=256)
    p.add_argument(
        "--checkpoints", type=_int_at_least(0), default=2, help="kept checkpoints sampled per run (0 = none)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_bootstrap", type=_int_at_least(MIN_BOOTSTRAP), default=1000)
    p.add_argument("--html_prompts", type=_int_at_least(0), default=50, help="prompts shown in report.html")
    p.add_argument("--device", type=_device, default="auto")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    return p


def _penalties(args, run_dirs: dict) -> dict:
    """The length/EOS penalties of "RM − penalties": flags win, else those of the first run that was
    trained with them (a PPO run, `scoring.run_penalties`), else none."""
    found = next((p for p in map(run_penalties, run_dirs.values()) if p is not None), PENALTIES_OFF)
    flags = {name: getattr(args, name) for name in PENALTIES_OFF}
    return {
        name: type(PENALTIES_OFF[name])(flags[name] if flags[name] is not None else found[name])
        for name in PENALTIES_OFF
    }


def load_splits(files: list[str], limit: int) -> tuple[list, list, dict, list]:
    """The prompts of every `--prompts` file (each its first `limit`, 0 = all), their titles, each file's
    prompt ids as a split named after it (prompts_test.jsonl -> "test"), and the prompt records whole."""
    prompts, titles, splits, records = [], [], {}, []
    for path in files:
        try:
            file_records = data.load_prompt_records(path)[: limit or None]
            file_prompts, file_titles = data.prompts_and_titles(file_records, path)
        except data.DataError as error:
            raise CompareError(str(error)) from None
        if not file_prompts:
            raise CompareError(f"--prompts {path}: no prompts in it")
        name = Path(path).stem.removeprefix("prompts_")
        if name in splits:
            raise CompareError(f"--prompts: two files named {name!r}; each file is a split named after it")
        splits[name] = range(len(prompts), len(prompts) + len(file_prompts))
        prompts += file_prompts
        titles += file_titles
        records += file_records
    return prompts, titles, splits, records


def split_metrics(entries: list[Entry], rows_by_label: dict, ref_label: str, *, prompt_ids, args) -> dict:
    """The tables of one split: every entry's metrics (checkpoints under their run) and every final run
    against every other (`paired_comparison`), on the prompts `prompt_ids`."""
    ids = set(prompt_ids)
    rows_of = {label: [r for r in rows if r["prompt_id"] in ids] for label, rows in rows_by_label.items()}
    runs = {}
    for entry in entries:
        rows = rows_of[entry.label]
        metrics = summarize(rows, rows_of[ref_label], args.n_bootstrap, args.seed)
        mismatch = next((r.get("kl_note") for r in rows if r.get("kl_note")), None)
        if mismatch:
            metrics["kl_note"] = mismatch
        if entry.best_of:
            metrics.update(kl_to_ref_se=None, kl_note="analytic: log N − (N−1)/N")
        metrics.update(model=entry.model, step=entry.step)
        if entry.step is None or entry.label == entry.run:
            runs[entry.label] = {**metrics, "checkpoints": []}
        else:
            runs[entry.run]["checkpoints"].append({"label": entry.label, **metrics})
    pairs = [
        {"a": a, "b": b, **paired_comparison(rows_of[a], rows_of[b], args.n_bootstrap, args.seed)}
        for b, a in itertools.combinations(runs, 2)
    ]  # a − b, a the later run: "ppo − sft", "dpo − ppo"
    return {"n_prompts": len(ids), "runs": runs, "pairs": pairs}


def run_compare(args) -> Path:
    out_dir = Path(args.output_dir)
    prompts, titles, splits, records = load_splits(args.prompts, args.limit)
    if "rm" in args.rewards:
        raise CompareError(
            "--rewards rm: the reward model is --reward_model; --rewards takes module:function entries"
        )
    try:
        reward_functions = load_reward_functions(args.rewards)
    except RewardFunctionError as error:
        raise CompareError(f"--rewards: {error}") from None
    # A reward model named on the command line must be there; only the default may be absent (no
    # reward model trained yet): then, as with `none`, the RM columns are left out with a note.
    if (
        args.reward_model.lower() != "none"
        and args.reward_model != DEFAULT_REWARD_MODEL
        and not has_reward_model(args.reward_model)
    ):
        raise CompareError(
            f"--reward_model {args.reward_model}: no reward model there (a model directory, or a "
            "run directory with final/); pass --reward_model none to compare without one"
        )

    entries, run_labels = [], []
    for spec in args.runs:
        group = resolve_entries(spec, args.base, args.checkpoints)
        run = group[0].run
        if run in run_labels:  # two runs with the same name (runs/a/ppo, runs/b/ppo): number them
            new_run = f"{run}#{run_labels.count(run) + 1}"
            for entry in group:
                entry.label, entry.run = entry.label.replace(run, new_run, 1), new_run
        run_labels.append(run)
        entries += group
    ref_spec = args.ref or next((s for s in args.runs if not s.split("=")[-1].startswith("bon:")), None)
    if ref_spec is None:
        raise CompareError(
            "--runs: best-of-N samples from the reference: name one with --ref (or a run before bon:N)"
        )
    ref_entry = resolve_entries(ref_spec, args.base, 0)[0]
    if ref_entry.best_of:
        raise CompareError(f"--ref {ref_spec}: the reference must be a model (best-of-N samples from it)")
    # The reference is a run when it is one of them (same model): its samples are then shared.
    same = [e for e in entries if e.step is None and e.model == ref_entry.model and not e.best_of]
    if same:
        ref_entry = same[0]
    else:
        ref_entry.label = ref_entry.run = f"ref:{ref_entry.label}"
    # Every run, finished or used through its newest checkpoint: its penalties and curves.
    run_dirs = {e.run: e.run_dir for e in entries if e.run_dir is not None}
    penalties = _penalties(args, run_dirs)

    # Every model's kind before anything is written or sampled: a reward model among the runs (or as --ref) would
    # otherwise fail only when its turn to sample comes, a causal LM as --reward_model when the judge loads.
    for entry in [ref_entry] + [e for e in entries if not e.best_of]:
        models.check_kind(entry.model, models.CAUSAL_LM)
    if args.reward_model and has_reward_model(args.reward_model):
        models.check_kind(str(reward_model_dir(args.reward_model)), models.REWARD_MODEL)
    out_dir.mkdir(parents=True, exist_ok=True)
    # `auto` -> what this machine runs; part of each model's sample stamp, and recorded in the report.
    precision = models.resolve_precision(args.dtype, models.pick_device(args.device))
    args.dtype = precision.name
    torch.manual_seed(args.seed)
    ref_model, ref_tokenizer = load_model_and_tokenizer(
        ref_entry.model, ref_entry.tokenizer_from, args.device, args.dtype
    )
    judge = Judge(args.reward_model, device=args.device, dtype=args.dtype, **penalties)
    if judge.note:
        print(f"note: {judge.note}", file=sys.stderr)
    best_of = [e for e in entries if e.best_of]
    if best_of and judge.scorer is None:
        raise CompareError(
            f"--runs {best_of[0].label}: best-of-N ranks by the reward model, and {judge.note}"
        )
    ref_key = _fingerprint(_model_stamp(ref_entry.model))
    ref = (ref_model, ref_tokenizer, ref_entry.model)

    rows_by_label = {}
    for entry in [ref_entry] + [e for e in entries if e is not ref_entry and not e.best_of]:
        rows_by_label[entry.label] = sample_entry(
            entry,
            prompts,
            titles,
            ref=ref,
            judge=judge,
            args=args,
            out_dir=out_dir,
            ref_key=ref_key,
            precision=precision,
            records=records,
            reward_functions=reward_functions,
        )
    if best_of:  # one pool of the reference's samples: bon:4 ranks the first 4 of bon:16's 16
        pool_args = copy.copy(args)
        pool_args.samples_per_prompt = args.samples_per_prompt * max(e.best_of for e in best_of)
        pool = Entry(
            "ref-candidates", ref_entry.model, "ref-candidates", tokenizer_from=ref_entry.tokenizer_from
        )
        candidates = sample_entry(
            pool,
            prompts,
            titles,
            ref=ref,
            judge=judge,
            args=pool_args,
            out_dir=out_dir,
            ref_key=ref_key,
            precision=precision,
            records=records,
            reward_functions=reward_functions,
        )
        for entry in best_of:
            entry.model = f"best of {entry.best_of} from {ref_entry.model}"
            rows_by_label[entry.label] = best_of_n_rows(entry, candidates, args.samples_per_prompt)

    # The headline tables are the last --prompts file's (the test split); every split, and all pooled, follow.
    tables = {
        name: split_metrics(entries, rows_by_label, ref_entry.label, prompt_ids=ids, args=args)
        for name, ids in splits.items()
    }
    if len(splits) > 1:
        tables["all"] = split_metrics(
            entries, rows_by_label, ref_entry.label, prompt_ids=range(len(prompts)), args=args
        )
    headline = list(splits)[-1]
    notes = [judge.note] if judge.note else []
    notes += sorted(
        {
            f"{label}: {m['kl_note']}"
            for label, m in tables[headline]["runs"].items()
            if m.get("kl_note") and label not in [e.label for e in best_of]
        }
    )
    if best_of:
        notes.append(
            f"bon:N: of N answers of the reference ({ref_entry.label}; the first is its own answer, the "
            "others other seeds) the one the reward model scores highest; KL to ref is the analytic "
            "log N − (N−1)/N, not an estimate from samples."
        )
    report = {
        "ref": ref_entry.label,
        "ref_model": ref_entry.model,
        "reward_model": getattr(judge, "path", None),
        "penalties": penalties,
        "settings": {
            "prompts": args.prompts,
            "n_prompts": len(prompts),
            "headline_split": headline,
            **{
                k: getattr(args, k)
                for k in (
                    "samples_per_prompt",
                    "max_new_tokens",
                    "temperature",
                    "seed",
                    "batch_size",
                    "n_bootstrap",
                    "checkpoints",
                    "rewards",
                )
            },
        },
        "environment": runlog.environment(precision),
        "runs": tables[headline]["runs"],
        "pairs": tables[headline]["pairs"],
        "splits": tables if len(splits) > 1 else {},
    }
    if ref_entry.label not in report["runs"]:
        ref_rows = [r for r in rows_by_label[ref_entry.label] if r["prompt_id"] in set(splits[headline])]
        notes.append(
            f"the reference {ref_entry.label} is not among the runs; its gold mean is "
            f"{fmt(summarize(ref_rows)['gold_mean'])}"
        )
    report["notes"] = notes

    (out_dir / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "compare.md").write_text(compare_markdown(report))
    plot_frontier(report, out_dir / "frontier.png")
    plot_training_curves(run_dirs, out_dir / "curves.png")
    write_html(
        report,
        {label: rows_by_label[label] for label in report["runs"]},
        out_dir,
        max_prompts=args.html_prompts,
        training=last_training_samples(run_dirs, per_run=4),
    )
    print(markdown_table(report))
    return out_dir


def main(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    try:
        return run_compare(args)
    except (CompareError, models.ModelNotFoundError, data.DataError, RewardFunctionError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
