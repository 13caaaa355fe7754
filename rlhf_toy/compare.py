"""Evaluation: every run answers the same prompts with the same sampling seeds, judged the same way.

    python scripts/compare.py --runs runs/sft runs/ppo runs/dpo base --ref runs/sft \
        --prompts data/prompts_eval.jsonl --output_dir reports/NAME [--limit N]

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

Sampling is batched and resumable: each model's scored samples go to `samples/KEY.jsonl` one batch at
a time, so a killed compare continues where it stopped. Every batch has its own seed, which is the
same for every model (common random numbers): a model compared with itself gives identical samples,
win rate 0.5 and KL 0 exactly.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import json
import math
import random
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhf_toy import data, models, runlog, sampling, task

DEFAULT_REWARD_MODEL = "runs/reward/final"
BASE = "base"
# Training-curve metrics overlaid across runs: (panel title, keys tried in order).
CURVES = [
    ("reward (RM score)", ("objective/scores", "score/rm")),
    ("KL to reference", ("objective/kl",)),
    ("gold (simulated human)", ("score/gold",)),
]


class CompareError(ValueError):
    """Bad compare input (a run with no model, a bad prompts file); the message says what to do."""


# ----------------------------------------------------------------------------------------------
# Finding the models
# ----------------------------------------------------------------------------------------------
@dataclass
class Entry:
    """One model to sample: a run's final model, one of its checkpoints, or a plain model."""

    label: str                 # what tables and plots call it ("ppo", "ppo@step-40")
    model: str                 # a loadable model directory or name
    run: str                   # the label of the run it belongs to
    run_dir: Path | None = None
    step: int | None = None    # a checkpoint's training step; None for the final model
    tokenizer_from: str | None = None   # where to load the tokenizer from, when `model` has none

    @property
    def key(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.@-]+", "_", self.label)


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").exists() or (path / "adapter_config.json").exists()


def checkpoints_of(run_dir: Path) -> list[tuple[int, Path]]:
    """Kept checkpoints of a run: HF trainers' `checkpoints/checkpoint-N/` (full or LoRA adapter) and
    the PPO stage's `checkpoints/step-N/policy/`."""
    found = []
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return found
    for path in root.iterdir():
        match = re.fullmatch(r"(?:checkpoint|step)-(\d+)", path.name)
        if not match:
            continue
        model_dir = path / "policy" if (path / "policy").is_dir() else path
        if _is_model_dir(model_dir):
            found.append((int(match.group(1)), model_dir))
    return sorted(found)


def _last_logged_step(run_dir: Path) -> int | None:
    steps = [r["step"] for r in runlog.read_jsonl(run_dir / "metrics.jsonl") if isinstance(r.get("step"), int)]
    return max(steps) if steps else None


def resolve_entries(spec: str, base: str, max_checkpoints: int) -> list[Entry]:
    """A `--runs` item as the models to sample: the final model first, then kept checkpoints."""
    label, _, target = spec.partition("=") if "=" in spec else ("", "", spec)
    if target == BASE:
        return [Entry(label or BASE, base, label or BASE)]
    path = Path(target).expanduser()
    if path.is_dir() and not _is_model_dir(path):
        run_label = label or path.name
        final = path / "final"
        ckpts = checkpoints_of(path)
        if not _is_model_dir(final) and not ckpts:
            raise CompareError(
                f"run directory {path} holds no model: no final/ and no checkpoints/ with a model in them "
                "(did its training finish? a model directory has a config.json)")
        entries = []
        if _is_model_dir(final):
            entries.append(Entry(run_label, str(final), run_label, path))
            last = _last_logged_step(path)
            if ckpts and last is not None and ckpts[-1][0] >= last:
                ckpts = ckpts[:-1]     # the last checkpoint holds the final weights: no need to sample them twice
        else:
            step, ckpt = ckpts.pop()   # an unfinished run: its newest checkpoint stands in for final/
            print(f"note: {path} has no final/; using its newest checkpoint (step {step})", file=sys.stderr)
            entries.append(Entry(run_label, str(ckpt), run_label, path, step, _tokenizer_dir(path, ckpt)))
        if max_checkpoints > 0 and ckpts:
            picks = sorted({round(i * (len(ckpts) - 1) / max(1, max_checkpoints - 1)) for i in range(max_checkpoints)})
            for step, ckpt in (ckpts[i] for i in picks if i < len(ckpts)):
                entries.append(Entry(f"{run_label}@{step}", str(ckpt), run_label, path, step, _tokenizer_dir(path, ckpt)))
        return entries
    if path.is_dir():
        name = path.parent.name if path.name == "final" else path.name
        return [Entry(label or name, str(path), label or name)]
    try:
        models.resolve_model_path(target)   # a model name (tiny-random-gpt2, embedded:..., a hub id)
    except models.ModelNotFoundError as error:
        raise CompareError(f"--runs {spec}: {error}") from None
    return [Entry(label or target, target, label or target)]


def _tokenizer_dir(run_dir: Path, model_dir: Path) -> str | None:
    for candidate in (model_dir, model_dir.parent, run_dir / "final"):
        if (candidate / "tokenizer_config.json").exists():
            return str(candidate)
    return None


def load_model_and_tokenizer(entry_model: str, tokenizer_from: str | None, device: str, dtype: str):
    """A causal LM (a LoRA adapter directory is merged into its base) and its prepared tokenizer."""
    from transformers import AutoTokenizer

    path = Path(entry_model)
    source = tokenizer_from or entry_model
    if Path(source).is_dir() and (Path(source) / "tokenizer_config.json").exists():
        # A checkpoint directory may hold a tokenizer and a LoRA adapter but no config.json.
        tokenizer = models.prepare_tokenizer(AutoTokenizer.from_pretrained(source))
    else:
        tokenizer = models.load_tokenizer(source)
    if path.is_dir() and (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        from peft import PeftModel

        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = models.load_causal_lm(base, tokenizer, device, dtype)
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    else:
        model = models.load_causal_lm(entry_model, tokenizer, device, dtype)
    model.eval()
    return model, tokenizer


def tokenizer_mismatch(tokenizer, ref_tokenizer) -> str | None:
    """Why a token-level KL between two models is undefined, or None when they share a tokenizer."""
    vocab, ref_vocab = tokenizer.get_vocab(), ref_tokenizer.get_vocab()
    if vocab == ref_vocab:
        return None
    only = sorted(set(vocab) - set(ref_vocab))[:3]
    return (f"its tokenizer differs from the reference's ({len(vocab)} vs {len(ref_vocab)} tokens"
            + (f"; e.g. {', '.join(map(repr, only))} only in the run's" if only else "; same tokens, different ids")
            + "): a per-token KL needs one token space, so kl_to_ref is left out for it. "
            "Use a --ref that shares its tokenizer (e.g. the model it was trained from).")


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def sequence_logprobs(model, tokenizer, prompts, response_ids, *, temperature: float,
                      max_prompt_length: int = 256) -> list[float]:
    """Σ_t log π(y_t | x, y_<t) of each response under `model`, at temperature T (logits / T, as
    sampling used). Prompts left-padded and responses right-padded, positions from the mask."""
    from rlhf_toy.ppo.core import logprobs_from_logits

    device = next(model.parameters()).device
    prompt_ids, prompt_mask, _ = sampling.encode_prompts(tokenizer, prompts, max_prompt_length, device)
    width = max(len(r) for r in response_ids)
    pad = tokenizer.pad_token_id
    responses = torch.tensor([list(r) + [pad] * (width - len(r)) for r in response_ids], device=device)
    response_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in response_ids], device=device)
    input_ids = torch.cat([prompt_ids, responses], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    # The logit at position i predicts token i + 1: the response's predictors start one before it.
    start = prompt_ids.shape[1]
    logprobs = logprobs_from_logits(logits[:, start - 1:-1], responses, temperature)
    return logprobs.masked_fill(response_mask == 0, 0.0).sum(dim=1).tolist()


class Judge:
    """Gold always; the reward model (and PPO's length/EOS penalties) when one is given and exists."""

    def __init__(self, reward_model: str | None, device: str = "auto", dtype: str = "auto",
                 length_coef: float = 0.0, length_target: int = 0, missing_eos_penalty: float = 0.0):
        self.penalties = {"length_coef": length_coef, "length_target": length_target,
                          "missing_eos_penalty": missing_eos_penalty}
        self.scorer, self.note = None, None
        if not reward_model or reward_model == "none":
            self.note = "no reward model given: rm_mean and score_mean are null"
            return
        path = Path(reward_model)
        if not (path / "config.json").exists() and not (path / "final" / "config.json").exists():
            self.note = f"no reward model at {reward_model} (train one with scripts/train_reward.py): rm_mean and score_mean are null"
            return
        try:
            from rlhf_toy.reward import RewardScorer
        except ImportError as error:
            self.note = f"the reward model could not be loaded ({error}): rm_mean and score_mean are null"
            return
        self.scorer = RewardScorer(str(path), device=device, dtype=dtype)
        self.path = str(path)

    def score(self, prompts, responses, n_tokens, has_eos) -> list[dict]:
        rows = []
        for response in responses:
            parts = task.gold_parts(response)
            rows.append({"gold": parts["gold"], "gold_parts": {k: v for k, v in parts.items() if k != "gold"}})
        if self.scorer is None:
            for row in rows:
                row.update(rm=None, score=None, length_penalty=None, eos_penalty=None)
            return rows
        from rlhf_toy.reward import sequence_score

        rm = self.scorer.score(prompts, responses).float().cpu()
        scored = sequence_score(rm, torch.tensor(n_tokens), torch.tensor(has_eos), **self.penalties)
        for i, row in enumerate(rows):
            for name in ("score", "rm", "length_penalty", "eos_penalty"):
                value = scored[name]
                row[name] = float(value[i] if torch.is_tensor(value) and value.dim() else value)
        return rows


def distinct_n(texts, n: int = 2) -> float:
    grams = [tuple(words[i:i + n]) for t in texts for words in [t.lower().split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def win_rate(golds: dict, ref_golds: dict, n_bootstrap: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Win rate by gold against the reference (ties half), per prompt averaged over its samples,
    with a 95% percentile-bootstrap interval over prompts. `golds`: {(prompt_id, sample): gold}."""
    per_prompt: dict = {}
    for (pid, j), g in golds.items():
        if (pid, j) in ref_golds:
            r = ref_golds[(pid, j)]
            per_prompt.setdefault(pid, []).append(1.0 if g > r else 0.5 if g == r else 0.0)
    wins = [statistics.mean(v) for v in per_prompt.values()]
    if not wins:
        return float("nan"), float("nan"), float("nan")
    rng = random.Random(seed)
    boots = sorted(statistics.mean(rng.choices(wins, k=len(wins))) for _ in range(n_bootstrap))
    lo, hi = boots[int(0.025 * (n_bootstrap - 1))], boots[int(math.ceil(0.975 * (n_bootstrap - 1)))]
    return statistics.mean(wins), lo, hi


def summarize(rows: list[dict], ref_rows: list[dict] | None, n_bootstrap: int, seed: int) -> dict:
    def mean(key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.mean(values) if values and len(values) == len(rows) else None

    out = {"n_samples": len(rows), "gold_mean": mean("gold"), "rm_mean": mean("rm"), "score_mean": mean("score"),
           "kl_to_ref": mean("kl")}
    kls = [r["kl"] for r in rows if r.get("kl") is not None]
    out["kl_to_ref_se"] = statistics.stdev(kls) / math.sqrt(len(kls)) if len(kls) > 1 and out["kl_to_ref"] is not None else None
    if ref_rows is not None:
        rate, lo, hi = win_rate({(r["prompt_id"], r["sample"]): r["gold"] for r in rows},
                                {(r["prompt_id"], r["sample"]): r["gold"] for r in ref_rows}, n_bootstrap, seed)
        out.update(win_rate_vs_ref=rate, win_rate_vs_ref_ci95=[lo, hi])
    out.update(length_mean=mean("n_tokens"), words_mean=mean("n_words"),
               eos_rate=statistics.mean(float(r["has_eos"]) for r in rows),
               distinct_2=distinct_n([r["response"] for r in rows], 2))
    return out


# ----------------------------------------------------------------------------------------------
# Sampling, batch by batch, resumable
# ----------------------------------------------------------------------------------------------
def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_stamp(model: str) -> dict:
    """Identifies a model's weights: a retrained run invalidates its cached samples."""
    path = Path(model)
    if not path.is_dir():
        return {"name": model}
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    return {"path": str(path.resolve()), "files": [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files]}


def _read_done(path: Path, batch_sizes: list[int]) -> list[dict]:
    """The rows of complete batches (a kill can leave a half-written last line or batch)."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    done, total = 0, 0
    for size in batch_sizes:
        if total + size > len(rows):
            break
        total += size
        done += 1
    return rows[:total]


def sample_entry(entry: Entry, prompts, ref, judge: Judge, args, out_dir: Path, ref_key: str) -> list[dict]:
    """Sample and score one model on every prompt (each `samples_per_prompt` times), resuming."""
    samples_dir = out_dir / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    path, meta_path = samples_dir / f"{entry.key}.jsonl", samples_dir / f"{entry.key}.meta.json"
    settings = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "seed", "batch_size",
                                              "samples_per_prompt", "max_prompt_length")}
    meta = {"label": entry.label, "model": entry.model, "run": entry.run, "step": entry.step,
            "fingerprint": _fingerprint([_model_stamp(entry.model), settings, prompts, ref_key,
                                         judge.penalties, getattr(judge, "path", None)])}
    batches = [(j, start) for j in range(args.samples_per_prompt) for start in range(0, len(prompts), args.batch_size)]
    sizes = [len(prompts[start:start + args.batch_size]) for _, start in batches]
    old_meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if old_meta is not None and old_meta.get("fingerprint") != meta["fingerprint"]:
        print(f"{entry.label}: model, prompts or settings changed since the last compare; resampling", file=sys.stderr)
        path.unlink(missing_ok=True)
    meta_path.write_text(json.dumps(meta) + "\n")
    rows = _read_done(path, sizes)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    n_done = sum(1 for i in range(len(batches)) if sum(sizes[:i + 1]) <= len(rows))
    if n_done == len(batches):
        return rows

    ref_model, ref_tokenizer, ref_model_name = ref
    is_ref = entry.model == ref_model_name
    if is_ref:
        model, tokenizer = ref_model, ref_tokenizer
    else:
        model, tokenizer = load_model_and_tokenizer(entry.model, entry.tokenizer_from, args.device, args.dtype)
    mismatch = None if is_ref else tokenizer_mismatch(tokenizer, ref_tokenizer)
    if mismatch:
        print(f"warning: {entry.label}: {mismatch}", file=sys.stderr)
    from tqdm.auto import tqdm

    for j, start in tqdm(batches[n_done:], desc=f"sampling {entry.label}", unit="batch", initial=n_done, total=len(batches)):
        batch = prompts[start:start + args.batch_size]
        # The batch's seed depends only on (seed, sample index, batch start): the same for every model.
        seed = args.seed * 1_000_003 + j * 10_007 + start
        samples = sampling.generate(model, tokenizer, batch, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, batch_size=len(batch), seed=seed,
                                    max_prompt_length=args.max_prompt_length)
        ids = [s.response_ids or [tokenizer.eos_token_id] for s in samples]
        n_tokens = [len(s.response_ids) for s in samples]
        has_eos = [s.has_eos for s in samples]
        if is_ref:
            kls, logps, ref_logps = [0.0] * len(batch), [None] * len(batch), [None] * len(batch)
        elif mismatch:
            kls, logps, ref_logps = [None] * len(batch), [None] * len(batch), [None] * len(batch)
        else:
            logps = sequence_logprobs(model, tokenizer, batch, ids, temperature=args.temperature,
                                      max_prompt_length=args.max_prompt_length)
            ref_logps = sequence_logprobs(ref_model, ref_tokenizer, batch, ids, temperature=args.temperature,
                                          max_prompt_length=args.max_prompt_length)
            kls = [a - b for a, b in zip(logps, ref_logps)]
        scores = judge.score(batch, [s.response for s in samples], n_tokens, has_eos)
        new = []
        for i, (s, sc) in enumerate(zip(samples, scores)):
            new.append({"prompt_id": start + i, "sample": j, "label": entry.label, "prompt": s.prompt,
                        "response": s.response, "n_tokens": n_tokens[i], "n_words": len(s.response.split()),
                        "has_eos": s.has_eos, **sc, "logp": logps[i], "ref_logp": ref_logps[i], "kl": kls[i],
                        **({"kl_note": mismatch} if mismatch else {})})
        runlog.append_jsonl(path, new)
        rows.extend(new)
    if not is_ref:
        del model
    return rows


# ----------------------------------------------------------------------------------------------
# Reports: compare.json, compare.md, PNGs, report.html
# ----------------------------------------------------------------------------------------------
def _fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


TABLE_COLUMNS = [("gold_mean", "gold"), ("rm_mean", "RM"), ("score_mean", "RM − penalties"), ("kl_to_ref", "KL to ref"),
                 ("win_rate_vs_ref", "win rate vs ref (95% CI)"), ("length_mean", "length (tokens)"),
                 ("eos_rate", "EOS rate"), ("distinct_2", "distinct-2")]


def _cell(metrics: dict, key: str) -> str:
    if key == "win_rate_vs_ref":
        lo, hi = metrics.get("win_rate_vs_ref_ci95") or [None, None]
        return f"{_fmt(metrics.get(key))} [{_fmt(lo, 2)}, {_fmt(hi, 2)}]"
    if key == "kl_to_ref" and metrics.get("kl_to_ref_se") is not None:
        return f"{_fmt(metrics[key])} ± {_fmt(metrics['kl_to_ref_se'], 2)}"
    return _fmt(metrics.get(key))


def markdown_table(report: dict) -> str:
    head = "| run | " + " | ".join(title for _, title in TABLE_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(TABLE_COLUMNS) + 1)]
    for label, metrics in report["runs"].items():
        lines.append(f"| {label} | " + " | ".join(_cell(metrics, k) for k, _ in TABLE_COLUMNS) + " |")
    ckpt_lines = []
    for label, metrics in report["runs"].items():
        for ckpt in metrics.get("checkpoints", []):
            ckpt_lines.append(f"| {ckpt['label']} | " + " | ".join(_cell(ckpt, k) for k, _ in TABLE_COLUMNS) + " |")
    if ckpt_lines:
        lines += ["", "Kept checkpoints:", "", head.replace("| run |", "| checkpoint |"),
                  "|" + "---|" * (len(TABLE_COLUMNS) + 1), *ckpt_lines]
    return "\n".join(lines)


def method_notes(report: dict) -> list[str]:
    s = report["settings"]
    return [
        f"Prompts: {s['prompts']} ({s['n_prompts']} prompts × {s['samples_per_prompt']} sample(s) each). Every model "
        f"samples with temperature {s['temperature']}, at most {s['max_new_tokens']} new tokens, no top-k/top-p, and the "
        "same per-batch seeds (common random numbers).",
        f"Reference: {report['ref']} ({report['ref_model']}).",
        "KL to ref: sequence KL(π‖π_ref) estimated on π's own samples as the mean over samples of "
        "Σ_t [log π(y_t|x,y<t) − log π_ref(y_t|x,y<t)] over the response tokens (EOS included), both log-probs "
        "taken at the sampling temperature (logits / T), so it is the KL between the distributions the samples come "
        "from; ± is one standard error.",
        f"Win rate vs ref: by gold, against the reference's answer to the same prompt with the same seed; ties count "
        f"half; 95% percentile bootstrap over prompts ({s['n_bootstrap']} resamples).",
        "distinct-2: distinct word bigrams / all word bigrams over the run's responses. length: response tokens "
        "(EOS included). EOS rate: share of responses that ended with EOS within the token limit.",
        "RM: " + (f"{report['reward_model']} (normalised: mean 0, std 1 on SFT samples); RM − penalties subtracts "
                  f"{report['penalties']['length_coef']}·max(0, tokens − {report['penalties']['length_target']}) and "
                  f"{report['penalties']['missing_eos_penalty']} for a missing EOS (PPO's training score)."
                  if report.get("reward_model") else "none."),
    ] + report.get("notes", [])


def plot_frontier(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (label, m) in enumerate(report["runs"].items()):
        color = f"C{i % 10}"
        points = [(c["step"], c["kl_to_ref"], c["gold_mean"]) for c in m.get("checkpoints", []) if c["kl_to_ref"] is not None]
        if m["kl_to_ref"] is not None:
            points.append((math.inf, m["kl_to_ref"], m["gold_mean"]))
        if not points:
            continue
        points.sort()
        ax.plot([p[1] for p in points], [p[2] for p in points], "-", color=color, alpha=0.4)
        ax.plot([p[1] for p in points[:-1]], [p[2] for p in points[:-1]], "o", color=color, ms=4, alpha=0.6)
        ax.plot([points[-1][1]], [points[-1][2]], "o", color=color, ms=9, label=label)
        ax.annotate(label, (points[-1][1], points[-1][2]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("KL to reference (nats per sequence)")
    ax.set_ylabel("gold mean")
    ax.set_title("gold vs KL (small dots: kept checkpoints)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(curves: dict, path: Path) -> None:
    """Training curves of the runs overlaid: {run: {panel: [(step, value)]}}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.6))
    for ax, (title, _) in zip(axes, CURVES):
        for i, (run, panels) in enumerate(curves.items()):
            points = panels.get(title)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], "-o" if len(points) < 12 else "-",
                        ms=3, color=f"C{i % 10}", label=run)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step (each run's own)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no run logged this", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_curves(run_dirs: dict) -> dict:
    curves = {}
    for run, run_dir in run_dirs.items():
        records = runlog.read_jsonl(run_dir / "metrics.jsonl")
        panels = {}
        for title, keys in CURVES:
            for key in keys:
                points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
                if points:
                    panels[title] = points
                    break
        if panels:
            curves[run] = panels
    return curves


def write_html(report: dict, rows_by_label: dict, out_dir: Path, max_prompts: int) -> Path:
    def img(name):
        encoded = base64.b64encode((out_dir / name).read_bytes()).decode()
        return f'<img src="data:image/png;base64,{encoded}" alt="{name}">'

    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>rlhf_toy compare</title><style>",
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}th{background:#f3f3f3}"
        ".resp{white-space:pre-wrap;max-width:360px}.s{color:#555;font-size:85%}img{max-width:100%}"
        ".good{background:#eaf7ea}.bad{background:#fbeaea}",
        "</style></head><body><h1>Comparison</h1>",
        "<table><tr><th>run</th>" + "".join(f"<th>{e(t)}</th>" for _, t in TABLE_COLUMNS) + "</tr>",
    ]
    for label, m in report["runs"].items():
        parts.append(f"<tr><td>{e(label)}</td>" + "".join(f"<td>{e(_cell(m, k))}</td>" for k, _ in TABLE_COLUMNS) + "</tr>")
    parts.append("</table><ul>" + "".join(f"<li>{e(n)}</li>" for n in method_notes(report)) + "</ul>")
    parts.append(f"<h2>Gold vs KL</h2>{img('frontier.png')}<h2>Training curves</h2>{img('curves.png')}")
    labels = list(report["runs"])
    by_prompt = {label: {(r["prompt_id"], r["sample"]): r for r in rows_by_label[label]} for label in labels}
    keys = sorted(by_prompt[labels[0]])[:max_prompts]
    parts.append(f"<h2>Samples ({len(keys)} shown)</h2><table><tr><th>prompt</th>"
                 + "".join(f"<th>{e(l)}</th>" for l in labels) + "</tr>")
    for key in keys:
        prompt = by_prompt[labels[0]][key]["prompt"]
        text = prompt[-1]["content"] if isinstance(prompt, list) else str(prompt)
        parts.append(f"<tr><td class='resp'>#{key[0]}" + (f" (sample {key[1]})" if key[1] else "") + f"<br>{e(text)}</td>")
        for label in labels:
            r = by_prompt[label].get(key)
            if r is None:
                parts.append("<td></td>")
                continue
            cls = "good" if r["gold"] > 0.3 else "bad" if r["gold"] < -0.3 else ""
            scores = f"gold {_fmt(r['gold'], 2)} · RM {_fmt(r.get('rm'), 2)} · {r['n_tokens']} tok" + ("" if r["has_eos"] else " · no EOS")
            parts.append(f"<td class='resp {cls}'>{e(r['response'])}<div class='s'>{e(scores)}</div></td>")
        parts.append("</tr>")
    parts.append("</table></body></html>")
    path = out_dir / "report.html"
    path.write_text("".join(parts), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True,
                   help="run directories, model directories or names, or `base`; LABEL=PATH names one")
    p.add_argument("--ref", default=None, help="the reference for KL and win rate (default: the first run)")
    p.add_argument("--base", default=models.DEFAULT_MODEL, help="the model `base` stands for")
    p.add_argument("--prompts", default="data/prompts_eval.jsonl")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--limit", type=int, default=0, help="use the first N prompts (0 = all)")
    p.add_argument("--reward_model", default=DEFAULT_REWARD_MODEL, help="reward model directory, or `none`")
    p.add_argument("--length_coef", type=float, default=None, help="default: from a PPO run's config.yaml, else 0")
    p.add_argument("--length_target", type=int, default=None)
    p.add_argument("--missing_eos_penalty", type=float, default=None)
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--samples_per_prompt", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_prompt_length", type=int, default=256)
    p.add_argument("--checkpoints", type=int, default=2, help="kept checkpoints sampled per run (0 = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_bootstrap", type=int, default=1000)
    p.add_argument("--html_prompts", type=int, default=50, help="prompts shown in report.html")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    return p


def _penalties(args, run_dirs: dict) -> dict:
    """PPO's length/EOS penalty settings: flags win, else the first run config that has them."""
    found = {}
    for run_dir in run_dirs.values():
        config_path = run_dir / "config.yaml"
        if config_path.exists():
            import yaml

            config = yaml.safe_load(config_path.read_text()) or {}
            if "length_coef" in config:
                found = config
                break
    return {"length_coef": float(args.length_coef if args.length_coef is not None else found.get("length_coef", 0.0)),
            "length_target": int(args.length_target if args.length_target is not None else found.get("length_target", 0)),
            "missing_eos_penalty": float(args.missing_eos_penalty if args.missing_eos_penalty is not None
                                         else found.get("missing_eos_penalty", 0.0))}


def run_compare(args) -> Path:
    out_dir = Path(args.output_dir)
    try:
        prompts = data.load_prompts(args.prompts)
    except data.DataError as error:
        raise CompareError(str(error)) from None
    if args.limit:
        prompts = prompts[: args.limit]

    entries, run_labels = [], []
    for spec in args.runs:
        group = resolve_entries(spec, args.base, args.checkpoints)
        run = group[0].run
        if run in run_labels:   # two runs with the same name (runs/a/ppo, runs/b/ppo): number them
            new_run = f"{run}#{run_labels.count(run) + 1}"
            for entry in group:
                entry.label, entry.run = entry.label.replace(run, new_run, 1), new_run
        run_labels.append(run)
        entries += group
    ref_spec = args.ref or args.runs[0]
    ref_entry = resolve_entries(ref_spec, args.base, 0)[0]
    # The reference is a run when it is one of them (same model): its samples are then shared.
    same = [e for e in entries if e.step is None and e.model == ref_entry.model]
    if same:
        ref_entry = same[0]
    else:
        ref_entry.label = ref_entry.run = f"ref:{ref_entry.label}"
    run_dirs = {e.run: e.run_dir for e in entries if e.run_dir is not None and e.step is None}
    penalties = _penalties(args, run_dirs)

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    ref_model, ref_tokenizer = load_model_and_tokenizer(ref_entry.model, ref_entry.tokenizer_from, args.device, args.dtype)
    judge = Judge(args.reward_model, args.device, args.dtype, **penalties)
    if judge.note:
        print(f"note: {judge.note}", file=sys.stderr)
    ref_key = _fingerprint(_model_stamp(ref_entry.model))
    ref = (ref_model, ref_tokenizer, ref_entry.model)

    rows_by_label = {}
    for entry in [ref_entry] + [e for e in entries if e is not ref_entry]:
        rows_by_label[entry.label] = sample_entry(entry, prompts, ref, judge, args, out_dir, ref_key)
    ref_rows = rows_by_label[ref_entry.label]

    notes = [judge.note] if judge.note else []
    report = {"ref": ref_entry.label, "ref_model": ref_entry.model, "reward_model": getattr(judge, "path", None),
              "penalties": penalties,
              "settings": {"prompts": args.prompts, "n_prompts": len(prompts),
                           **{k: getattr(args, k) for k in ("samples_per_prompt", "max_new_tokens", "temperature",
                                                            "seed", "batch_size", "n_bootstrap", "checkpoints")}},
              "runs": {}}
    for entry in entries:
        metrics = summarize(rows_by_label[entry.label], ref_rows, args.n_bootstrap, args.seed)
        mismatch = next((r.get("kl_note") for r in rows_by_label[entry.label] if r.get("kl_note")), None)
        if mismatch:
            metrics["kl_note"] = mismatch
            notes.append(f"{entry.label}: {mismatch}")
        metrics.update(model=entry.model, step=entry.step)
        if entry.step is None or entry.label == entry.run:
            report["runs"][entry.label] = {**metrics, "checkpoints": []}
        else:
            report["runs"][entry.run]["checkpoints"].append({"label": entry.label, **metrics})
    if ref_entry.label not in report["runs"]:
        notes.append(f"the reference {ref_entry.label} is not among the runs; its gold mean is "
                     f"{_fmt(summarize(ref_rows, None, 0, 0)['gold_mean'])}")
    report["notes"] = notes

    (out_dir / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "compare.md").write_text(
        "# Comparison\n\n" + markdown_table(report) + "\n\n" + "\n".join(f"- {n}" for n in method_notes(report))
        + "\n\nPlots: `frontier.png` (gold vs KL), `curves.png` (training curves); samples side by side in "
        "`report.html`; every scored sample in `samples/`.\n")
    plot_frontier(report, out_dir / "frontier.png")
    plot_curves(training_curves(run_dirs), out_dir / "curves.png")
    write_html(report, {label: rows_by_label[label] for label in report["runs"]}, out_dir, args.html_prompts)
    print(markdown_table(report))
    return out_dir


def main(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    try:
        return run_compare(args)
    except (CompareError, models.ModelNotFoundError, data.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
