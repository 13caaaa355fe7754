"""Run-level cross-check and benchmark: our PPO (`rlhf_toy.stages.ppo.trainer.train_ppo`) and TRL 1.12's
`trl.experimental.ppo.PPOTrainer`, same model, same prompts, matched hyperparameters.

    python scripts/crosscheck_trl.py --config configs/crosscheck.yaml      # curves + crosscheck.md
    python scripts/bench_ppo.py --config configs/crosscheck.yaml           # speed + peak memory

What "matched" means here (and where it cannot be, said in crosscheck.md):
* the same policy / reference (the SFT model), value model (initialised from the RM), tokenizer
  (distinct pad, left padding), prompts formatted by the same chat template, and the same prompt
  batches in the same order (TRL's shuffling dataloader is replaced by one that reads our order);
* the same β (fixed), k1/k3, γ, λ, ε, ε_v, vf_coef, epochs, minibatches, batch, learning rate with
  TRL's linear decay, AdamW eps and weight decay, temperature, response length, EOS stop, missing-EOS
  penalty; our length penalty and score clip are off, gradient clipping off (TRL's loop has none);
* the reward: ours is the RM's raw score times the stored gain plus bias.  TRL takes the score head's
  raw output, so the copy of the RM given to TRL has gain and bias folded into its score head
  (weight·gain, bias = bias): both optimise the same normalised RM score.

One difference in the reward input remains by construction: TRL scores the token sequence as sampled
(left-padded prompt + response, score at the last response token, the EOS when there is one); ours
re-tokenises the decoded text and always appends EOS (`reward.encode_for_reward`), so responses cut
at the length limit are scored differently (both get the missing-EOS penalty on top).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from rlhf_toy import data, models, runlog, sequences
from rlhf_toy.config import ConfigError, save_config
from rlhf_toy.evaluation.report import fmt, plot_panels
from rlhf_toy.scoring import (
    NORMALIZATION_FILE,
    RewardScorer,
    load_reward_model,
    read_normalization,
    reward_model_dir,
)
from rlhf_toy.stages.common import setup_run
from rlhf_toy.stages.ppo.config import PPOStageConfig
from rlhf_toy.stages.ppo.models import AdapterDisabled
from rlhf_toy.stages.ppo.trainer import evaluate, train_ppo

# The curves overlaid in the PNG: (metric, title). TRL logs these names itself; ours uses the same.
CURVES = [
    ("objective/scores", "reward (normalised RM score − EOS penalty)"),
    ("objective/kl", "KL(π‖π_ref) per sequence"),
    ("objective/entropy", "entropy per sequence (−Σ log π)"),
    ("policy/clipfrac_avg", "policy clip fraction"),
    ("objective/rlhf_reward", "RLHF reward (score − β·KL)"),
    ("loss/value_avg", "value loss"),
]
CURVE_LABELS = [label for _, label in CURVES]


@dataclass
class CrosscheckRunConfig(PPOStageConfig):
    """The PPO stage's config (every field, same meaning) plus where the cross-check writes. `ours_config`
    switches off what TRL does not have (length penalty, score clip, gradient clipping, adaptive β) and
    the TRL side gets the same values through `build_trl_trainer`."""

    model_name_or_path: str = "runs/sft/final"  # policy init and reference, both trainers
    output_dir: str = "reports/crosscheck"  # crosscheck.md, .png, .json (small files only)
    work_dir: str = "runs/crosscheck"  # the two trainers' run directories (models, metrics)
    num_eval_prompts: int = 32
    total_episodes: int = 64
    batch_size: int = 8
    num_ppo_epochs: int = 2
    response_length: int = 32
    max_prompt_length: int = 128
    learning_rate: float = 3e-6
    device: str = "cpu"
    dtype: str = "float32"
    report_to: str = "none"
    resume: bool = False

    def validate(self):
        super().validate()
        # TRL's PPOTrainer has GAE, the KL in the reward, one reward model, the token-mean loss, one sample a prompt
        for name, trl_value in (
            ("advantage_estimator", "gae"),
            ("kl_in", "reward"),
            ("rewards", ["rm"]),
            ("loss_type", "bnpo"),
            ("num_generations", 1),
        ):
            if getattr(self, name) != trl_value:
                raise ConfigError(
                    f"{name}: {getattr(self, name)!r}: the run-level cross-check trains TRL's "
                    f"PPOTrainer beside ours, which has only {name}: {trl_value!r} "
                    "(scripts/crosscheck_trl.py --numeric checks the critic-free estimators against "
                    "TRL's GRPOTrainer and RLOOTrainer)"
                )


# ----------------------------------------------------------------------------------------------
# ours
# ----------------------------------------------------------------------------------------------
def ours_config(
    cfg: CrosscheckRunConfig, output_dir: str, num_eval_prompts: int | None = None
) -> PPOStageConfig:
    """Our PPOStageConfig with TRL's semantics switched on where they are options."""
    same = {f.name: getattr(cfg, f.name) for f in fields(PPOStageConfig)}
    return PPOStageConfig(
        **{
            **same,
            "output_dir": output_dir,
            "num_eval_prompts": cfg.num_eval_prompts if num_eval_prompts is None else num_eval_prompts,
            "length_coef": 0.0,  # TRL has no length penalty
            "score_clip": 0.0,  # TRL does not clip the score
            "kl_target": 0.0,  # TRL's β is fixed
            "gradient_accumulation_steps": 1,
            "lr_scheduler_type": "linear",
            "max_grad_norm": 1e9,  # TRL's PPO loop never clips gradients
            "sample_every": 1,
            "save_steps": cfg.num_steps,
            "save_total_limit": 1,
            "report_to": "none",
            "resume": False,
        }
    )


def run_ours(
    cfg: CrosscheckRunConfig, run_dir: Path, num_eval_prompts: int | None = None, on_step_end=None
) -> dict[str, Any]:
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    ocfg = ours_config(cfg, str(run_dir), num_eval_prompts)
    started = time.time()
    train_ppo(ocfg, on_step_end=on_step_end)
    wall = time.time() - started
    history = [r for r in runlog.read_jsonl(run_dir / "metrics.jsonl") if "objective/kl" in r]
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    steps = [
        {
            "step": r["step"],
            "step_s": r["time/rollout_s"] + r["time/update_s"],
            "tokens": r["response/length_mean"] * cfg.batch_size,
            **{
                k: r.get(k)
                for k in (
                    "time/generation_s",
                    "time/ref_forward_s",
                    "time/value_forward_s",
                    "time/scoring_s",
                    "time/rollout_s",
                    "time/update_s",
                    "perf/update_tokens",
                )
            },
        }
        for r in history
    ]
    batches = [
        [s["prompt"] for s in runlog.read_jsonl(run_dir / "samples.jsonl") if s["step"] == r["step"]]
        for r in history
    ]
    return {"history": history, "steps": steps, "summary": summary, "wall_s": wall, "batches": batches}


def prompt_order(cfg: CrosscheckRunConfig, prompts: list) -> list:
    """The prompts in the order our trainer draws them (`data.prompt_batch`, step by step), so TRL can be
    fed the same batches. Checked against ours' samples.jsonl."""
    return [
        p
        for step in range(cfg.num_steps)
        for p in data.prompt_batch(prompts, step, batch_size=cfg.batch_size, seed=cfg.seed)
    ]


# ----------------------------------------------------------------------------------------------
# TRL
# ----------------------------------------------------------------------------------------------
def normalised_reward_model_for_trl(rm_path, dtype, gain: float, bias: float):
    """The RM with the normalisation folded into its score head: score' = gain·score + bias.
    (Llama's / GPT-2's score head has no bias, so it is replaced by a Linear with one.)"""

    rm = load_reward_model(rm_path, device="cpu", dtype="float32").to(dtype)
    old = rm.score
    new = torch.nn.Linear(old.in_features, old.out_features, bias=True, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight * gain)
        new.bias.fill_(bias)
    rm.score = new
    return rm


class TRLTimers:
    """Time split of TRL's PPOTrainer.train(), by wrapping the module-level functions it calls:
    `batch_generation` (sampling), `forward` without grad (reference), `get_reward` (value model
    vs reward model). Everything else in a step is the update. Also counts response tokens."""

    def __init__(self, reward_model):
        self.reward_model = reward_model
        self.acc = {"generation": 0.0, "ref_forward": 0.0, "value_forward": 0.0, "scoring": 0.0}
        self.tokens = 0

    def reset(self):
        self.acc = dict.fromkeys(self.acc, 0.0)
        self.tokens = 0

    @contextlib.contextmanager
    def installed(self):
        import trl.experimental.ppo.ppo_trainer as M

        orig = {"batch_generation": M.batch_generation, "forward": M.forward, "get_reward": M.get_reward}

        def timed(key_of, fn):
            def wrapper(*a, **k):
                t0 = time.perf_counter()
                out = fn(*a, **k)
                key = key_of(*a)
                if key:
                    self.acc[key] += time.perf_counter() - t0
                return out

            return wrapper

        def count_reward(model, query_responses, pad_token_id, context_length):
            if model is self.reward_model:
                self.tokens += int((query_responses[:, context_length:] != pad_token_id).sum())
                return "scoring"
            return "value_forward"

        M.batch_generation = timed(lambda *a: "generation", orig["batch_generation"])
        M.forward = timed(lambda *a: None if torch.is_grad_enabled() else "ref_forward", orig["forward"])
        M.get_reward = timed(count_reward, orig["get_reward"])
        try:
            yield self
        finally:
            for k, v in orig.items():
                setattr(M, k, v)


def build_trl_trainer(cfg: CrosscheckRunConfig, run_dir: Path, ordered_prompts: list):
    """TRL's PPOTrainer with a PPOConfig matched to `ours_config(cfg)`; returns (trainer, tokenizer, rm_copy)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    # TRL's bf16=True is accelerate's autocast around the prepared model's forward (the update; its
    # rollout's generate and reference/reward forwards run outside it): float32 weights stay when mixed.
    precision = models.resolve_precision(cfg.dtype, torch.device(cfg.device))
    dtype = precision.weights
    if precision.mixed:
        # TRL's PPOTrainer builds its Accelerator without `mixed_precision`, so `bf16=True` alone changes
        # nothing; accelerate reads this variable instead (what `accelerate launch --mixed_precision bf16` sets).
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"

    tokenizer = models.load_tokenizer(cfg.model_name_or_path)
    policy_path = models.resolve_model_path(cfg.model_name_or_path)
    rm_dir = reward_model_dir(cfg.reward_model_path)
    norm = read_normalization(rm_dir)

    def causal_lm():
        m = AutoModelForCausalLM.from_pretrained(policy_path, dtype=dtype)
        models.align_with_tokenizer(m, tokenizer)
        return m

    policy = causal_lm()
    ref = None if cfg.use_lora else causal_lm()
    value_model = AutoModelForSequenceClassification.from_pretrained(str(rm_dir), num_labels=1, dtype=dtype)
    value_model.config.pad_token_id = tokenizer.pad_token_id
    reward_model = normalised_reward_model_for_trl(rm_dir, dtype, float(norm["gain"]), float(norm["bias"]))
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    peft_config = None
    if cfg.use_lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )

    # the same token ids as our rollout: chat template + generation prompt, left-truncated
    ids = [sequences.prompt_ids(tokenizer, p, cfg.max_prompt_length) for p in ordered_prompts]
    ds = Dataset.from_dict({"input_ids": ids})
    args = PPOConfig(
        output_dir=str(run_dir),
        report_to=[],
        seed=cfg.seed,
        per_device_train_batch_size=cfg.batch_size,  # TRL: micro-batch = batch / num_mini_batches, as ours
        gradient_accumulation_steps=1,
        local_rollout_forward_batch_size=cfg.batch_size,
        total_episodes=cfg.num_steps * cfg.batch_size,
        num_ppo_epochs=cfg.num_ppo_epochs,
        num_mini_batches=cfg.num_mini_batches,
        response_length=cfg.response_length,
        stop_token="eos",
        temperature=cfg.temperature,
        kl_coef=cfg.kl_coef,
        kl_estimator=cfg.kl_estimator,
        gamma=cfg.gamma,
        lam=cfg.lam,
        cliprange=cfg.cliprange,
        cliprange_value=cfg.cliprange_value,
        vf_coef=cfg.vf_coef,
        whiten_rewards=cfg.whiten_rewards,
        missing_eos_penalty=cfg.missing_eos_penalty,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="linear",
        adam_epsilon=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
        num_sample_generations=0,
        save_strategy="no",
        logging_steps=1,
        use_cpu=cfg.device == "cpu",
        disable_tqdm=True,
        bf16=precision.compute == torch.bfloat16,
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref,
        reward_model=reward_model,
        train_dataset=ds,
        value_model=value_model,
        peft_config=peft_config,
    )
    # TRL shuffles its prompts; read them in our order instead, so both see the same batches.
    trainer.dataloader = trainer.accelerator.prepare(
        DataLoader(
            ds, batch_size=cfg.batch_size, shuffle=False, collate_fn=trainer.data_collator, drop_last=True
        )
    )
    return trainer, tokenizer, reward_model


def run_trl(
    cfg: CrosscheckRunConfig, run_dir: Path, evaluate_after: bool = True, callbacks=()
) -> dict[str, Any]:
    import shutil
    import warnings

    import transformers
    from transformers import TrainerCallback

    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    ordered = prompt_order(cfg, data.load_prompts(cfg.prompts))
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer, tokenizer, reward_model = build_trl_trainer(cfg, run_dir, ordered)
    timers = TRLTimers(reward_model)
    steps: list[dict] = []

    class StepTimes(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t = time.perf_counter()
            timers.reset()

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            step_s = now - self.t
            split = {f"time/{k}_s": v for k, v in timers.acc.items()}
            rollout = sum(timers.acc.values())
            steps.append(
                {
                    "step": len(steps) + 1,
                    "step_s": step_s,
                    "tokens": timers.tokens,
                    **split,
                    "time/rollout_s": rollout,
                    "time/update_s": step_s - rollout,
                }
            )
            timers.reset()
            self.t = time.perf_counter()

    for callback in (StepTimes(), *callbacks):
        trainer.add_callback(callback)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    started = time.time()
    try:  # TRL prints its metrics dict every step (PrinterCallback); keep the output readable
        with timers.installed(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
    finally:
        transformers.logging.set_verbosity(verbosity)
    wall = time.time() - started
    history = [
        {"step": i + 1, **h}
        for i, h in enumerate(x for x in trainer.state.log_history if "objective/kl" in x)
    ]
    for h, s in zip(history, steps):
        h.update({k: v for k, v in s.items() if k.startswith("time/")})
        h["response/length_mean"] = s["tokens"] / cfg.batch_size
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    result = {
        "history": history,
        "steps": steps,
        "wall_s": wall,
        "batches": [ordered[i * cfg.batch_size : (i + 1) * cfg.batch_size] for i in range(cfg.num_steps)],
    }
    if evaluate_after and cfg.num_eval_prompts:
        policy = trainer.accelerator.unwrap_model(trainer.model).policy
        scorer = RewardScorer(cfg.reward_model_path, device=cfg.device, dtype=cfg.dtype)
        eval_prompts, eval_titles = data.load_prompts_and_titles(cfg.eval_prompts, cfg.num_eval_prompts)
        reference = AdapterDisabled(policy) if cfg.use_lora else trainer.ref_model  # as ours
        result["after"] = evaluate(
            cfg,
            policy,
            reference=reference,
            tokenizer=tokenizer,
            scorer=scorer,
            eval_prompts=eval_prompts,
            when="after (TRL)",
            precision=scorer.precision,
            titles=eval_titles,
        )
        (run_dir / "summary.json").write_text(json.dumps({"after": result["after"]}, indent=2) + "\n")
    del trainer
    return result


# ----------------------------------------------------------------------------------------------
# the run-level cross-check
# ----------------------------------------------------------------------------------------------
def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def throughput(res: dict, batch_size: int) -> dict:
    """Episodes/s and response tokens/s over the steps after the first (the first pays warm-up)."""
    steps = res["steps"][1:] or res["steps"]
    secs = sum(s["step_s"] for s in steps)
    return {
        "episodes_per_s": batch_size * len(steps) / secs,
        "tokens_per_s": sum(s["tokens"] for s in steps) / secs,
        "step_s_median": _median([s["step_s"] for s in steps]),
        "steps_timed": len(steps),
    }


def history_curves(ours: dict, trl: dict) -> dict:
    """Both trainers' histories as plot_panels' curves: {trainer: {CURVES label: [(step, value)]}}."""
    return {
        name: {
            label: [(h["step"], h[key]) for h in side["history"] if h.get(key) is not None]
            for key, label in CURVES
        }
        for name, side in (("ours (rlhf_toy)", ours), ("TRL PPOTrainer", trl))
    }


def run_crosscheck(cfg: CrosscheckRunConfig) -> dict[str, Any]:
    """Both trainers, one after the other in this process; writes crosscheck.{md,png,json}."""

    # The report directory is not a run directory (run_ours and run_trl start their own afresh).
    setup_run(cfg)  # seed, threads
    save_config(cfg, cfg.output_dir)
    out = Path(cfg.output_dir)
    work = Path(cfg.work_dir)
    ours = run_ours(cfg, work / "ours")
    trl = run_trl(cfg, work / "trl")
    same_batches = [
        sorted(map(json.dumps, a)) == sorted(map(json.dumps, b))
        for a, b in zip(ours["batches"], trl["batches"])
    ]
    report = {
        "config": {**asdict(cfg), "num_steps": cfg.num_steps},
        "trl_version": _version("trl"),
        "transformers_version": _version("transformers"),
        "torch_version": torch.__version__,
        "environment": runlog.environment(models.resolve_precision(cfg.dtype, torch.device(cfg.device))),
        "same_prompt_batches": all(same_batches) and len(same_batches) == cfg.num_steps,
        "ours": {
            "history": ours["history"],
            "eval_before": ours["summary"].get("before"),
            "eval_after": ours["summary"].get("after"),
            "throughput": throughput(ours, cfg.batch_size),
            "time_split_median": _split(ours["steps"]),
            "wall_s": ours["wall_s"],
        },
        "trl": {
            "history": trl["history"],
            "eval_after": trl.get("after"),
            "throughput": throughput(trl, cfg.batch_size),
            "time_split_median": _split(trl["steps"]),
            "wall_s": trl["wall_s"],
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    name = Path(cfg.model_name_or_path).name if "/" in cfg.model_name_or_path else cfg.model_name_or_path
    plot_panels(
        [(history_curves(ours, trl), "PPO step", labels) for labels in (CURVE_LABELS[:3], CURVE_LABELS[3:])],
        out / "crosscheck.png",
        styles={"ours (rlhf_toy)": "-o", "TRL PPOTrainer": "--s"},
        title=f"ours vs TRL {report['trl_version']} PPOTrainer — {cfg.model_name_or_path}, "
        f"batch {cfg.batch_size}, {cfg.num_ppo_epochs} epochs × {cfg.num_mini_batches} minibatches, "
        f"β={cfg.kl_coef}, T={cfg.temperature}, {cfg.response_length} new tokens",
    )
    (out / "crosscheck.json").write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    (out / "crosscheck.md").write_text(format_markdown(report, name))
    return report


def _split(steps):
    keys = (
        "time/generation_s",
        "time/ref_forward_s",
        "time/value_forward_s",
        "time/scoring_s",
        "time/rollout_s",
        "time/update_s",
    )
    steps = steps[1:] or steps
    return {k: _median([s.get(k) for s in steps]) for k in keys}


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


def _version(pkg):
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # pragma: no cover
        return "?"


def format_markdown(r: dict, model_name: str) -> str:
    c = r["config"]
    o, t = r["ours"], r["trl"]
    lines = [
        f"# Run-level cross-check: ours vs TRL {r['trl_version']} `PPOTrainer`",
        "",
        f"Policy/reference `{c['model_name_or_path']}`, reward model and value init `{c['reward_model_path']}`; "
        f"{c['num_steps']} PPO steps of {c['batch_size']} episodes, {c['num_ppo_epochs']} epochs × "
        f"{c['num_mini_batches']} minibatches, lr {c['learning_rate']:g} (linear decay), β = {c['kl_coef']} "
        f"({c['kl_estimator']}), γ = {c['gamma']}, λ = {c['lam']}, ε = {c['cliprange']}, ε_v = {c['cliprange_value']}, "
        f"vf_coef = {c['vf_coef']}, T = {c['temperature']}, {c['response_length']} new tokens at most, stop at EOS, "
        f"missing-EOS penalty {c['missing_eos_penalty']}, seed {c['seed']}, {c['dtype']} on {c['device']}"
        + (f", LoRA r={c['lora_r']} (reference = adapter disabled)" if c["use_lora"] else "")
        + ".",
        f"transformers {r['transformers_version']}, torch {r['torch_version']}.",
        "",
        "Command: `python scripts/crosscheck_trl.py --config <config> --output_dir "
        f"{c['output_dir']}`. Curves: `crosscheck.png`; every number: `crosscheck.json`.",
        "",
        "## How the two are matched",
        "",
        *(
            [
                f"- **Not matched in one respect: ours ran with `critic: {c['critic']}`** (a value head on "
                "the policy's "
                "trunk; TRL's critic is a separate model initialised from the RM).",
                "",
            ]
            if c.get("critic", "separate") != "separate"
            else []
        ),
        "- Same models, tokenizer (distinct pad, left padding), chat-formatted prompts, and the same prompt "
        f"batches in the same order (TRL's shuffling dataloader replaced by one in our order; checked: "
        f"{'identical' if r['same_prompt_batches'] else 'NOT identical'}).",
        "- Our length penalty off (`length_coef: 0`), our score clip off, our gradient clipping off (TRL's "
        "PPO loop does not clip); AdamW eps and weight decay set equal on both sides; TRL micro-batch = minibatch.",
        "- **Reward**: ours is the RM's raw score × gain + bias (the normalisation sidecar of the RM). TRL uses "
        "the score head's raw output, so the RM copy given to TRL has the normalisation folded into its score "
        "head (weight × gain, a bias = bias): both optimise the same normalised score. The value models start "
        "from the un-normalised RM on both sides.",
        "- Remaining differences, by design or by construction: TRL scores the sampled token ids (left-padded, "
        "score at the last response token) while ours re-tokenises the decoded text and always appends EOS — "
        "identical for responses that stop with EOS, different for responses cut at the length limit; TRL puts "
        "the score one token past the last response token when there is room (`padding_mask_p1`) and trains the "
        "value there too, ours on the last real token (see the numeric cross-check); TRL's weight decay skips "
        "biases and norms; the two sample different responses (different RNG use), so the curves agree in "
        "distribution, not token for token.",
        "",
        "## Curves (final step, and mean over all steps)",
        "",
        "| metric | ours final | TRL final | ours mean | TRL mean |",
        "|---|---|---|---|---|",
    ]
    for key, _ in CURVES + [("response/length_mean", ""), ("val/num_eos_tokens", "")]:
        ov = [h.get(key) for h in o["history"] if h.get(key) is not None]
        tv = [h.get(key) for h in t["history"] if h.get(key) is not None]
        lines.append(
            f"| `{key}` | {fmt(ov[-1] if ov else None, 4)} | {fmt(tv[-1] if tv else None, 4)} | "
            f"{fmt(sum(ov) / len(ov) if ov else None, 4)} | {fmt(sum(tv) / len(tv) if tv else None, 4)} |"
        )
    lines += ["", "(`val/num_eos_tokens` is the number of responses with EOS in the batch, for both.)", ""]
    lines += [
        f"## Evaluation on {c['num_eval_prompts']} eval prompts (same sampling: `sequences.generate`, seed "
        f"{c['seed'] + 1}, "
        f"T = {c['temperature']}; gold judge `task.gold_score`; normalised RM `RewardScorer`)",
        "",
        "| policy | gold mean | RM mean | KL to ref | length | EOS rate |",
        "|---|---|---|---|---|---|",
    ]
    for label, ev in (
        ("initial (both)", o.get("eval_before")),
        ("ours after", o.get("eval_after")),
        ("TRL after", t.get("eval_after")),
    ):
        if ev:
            lines.append(
                f"| {label} | {fmt(ev['gold_mean'])} | {fmt(ev['rm_mean'])} | {fmt(ev['kl_to_ref'])} | "
                f"{fmt(ev['length_mean'], 1)} | {fmt(ev['eos_rate'], 2)} |"
            )
    ot, tt = o["throughput"], t["throughput"]
    lines += [
        "",
        f"## Throughput (steps 2–{c['num_steps']}, both in this one process, one after the other)",
        "",
        "| | episodes/s | response tokens/s | median s/step | generation | ref fwd | value fwd | scoring | update |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, tp, sp in (("ours", ot, o["time_split_median"]), ("TRL", tt, t["time_split_median"])):
        lines.append(
            f"| {label} | {fmt(tp['episodes_per_s'])} | {fmt(tp['tokens_per_s'], 1)} | "
            f"{fmt(tp['step_s_median'], 2)} | "
            + " | ".join(
                fmt(sp[f"time/{k}_s"], 2)
                for k in ("generation", "ref_forward", "value_forward", "scoring", "update")
            )
            + " |"
        )
    ratio = ot["episodes_per_s"] / tt["episodes_per_s"] if tt["episodes_per_s"] else float("nan")
    lines += [
        "",
        f"ours / TRL episodes/s: **{ratio:.2f}×** (time split: median seconds per step). For a careful "
        "benchmark (alternating fresh processes, peak memory) see `scripts/bench_ppo.py` / `reports/bench/`.",
        "",
    ]
    if "environment" in r:
        lines += [runlog.environment_line(r["environment"]), ""]
    return "\n".join(lines)


def make_tiny_reward_model(
    out_dir, base: str = models.TINY_MODEL, *, gain: float = 2.0, bias: float = 0.5, seed: int = 0
) -> Path:
    """A reward model directory for tests and timing before a trained RM exists: a sequence-
    classification model from `base` (random score head) with a normalisation sidecar."""
    from transformers import AutoModelForSequenceClassification

    out_dir = Path(out_dir)
    if (out_dir / NORMALIZATION_FILE).exists():
        return out_dir
    torch.manual_seed(seed)
    tokenizer = models.load_tokenizer(base)
    rm = AutoModelForSequenceClassification.from_pretrained(models.resolve_model_path(base), num_labels=1)
    if len(tokenizer) > rm.get_input_embeddings().weight.shape[0]:
        rm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    rm.config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0 / math.sqrt(rm.score.weight.shape[1]))
    rm.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / NORMALIZATION_FILE).write_text(
        json.dumps({"gain": gain, "bias": bias, "note": "synthetic"}) + "\n"
    )
    return out_dir


if __name__ == "__main__":  # python -m rlhf_toy.verify.trl_run make-rm OUT_DIR [BASE]
    if sys.argv[1:2] == ["make-rm"]:
        print(make_tiny_reward_model(sys.argv[2], *(sys.argv[3:4] or [models.TINY_MODEL])))
