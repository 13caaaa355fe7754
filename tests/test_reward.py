import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from transformers import AutoModelForSequenceClassification

from rlhf_toy import models, runlog, task
from rlhf_toy.config import parse_config
from rlhf_toy.scoring import (
    NORMALIZATION_FILE,
    RewardNormalizationMissing,
    RewardScorer,
    encode_for_reward,
    sequence_score,
)
from rlhf_toy.stages.reward import (
    RewardStageConfig,
    calibrate,
    clean_pairs,
    fit_normalization,
    tokenize_pairs,
    train_reward,
)

# Words the tiny word-level tokenizer knows; the marker word makes a response "chosen".
FILLER = "the film story plot cast acting music visuals ending was is very quite really a".split()
MARKER = "wonderful"


def response(rng, marker: bool) -> str:
    words = rng.sample(FILLER, 5)
    if marker:
        words.insert(rng.randrange(len(words) + 1), MARKER)
    return " ".join(words) + " ."


def write_pairs(path, n_prompts=80, pairs_per_prompt=2, seed=0, extra=()):
    """An easy synthetic preference set: the chosen response contains the marker word, the rejected does not."""
    rng = random.Random(seed)
    prompts, _, _ = task.make_prompts(n_prompts, 1, 0, seed=seed)
    rows = []
    for row in prompts:
        for _ in range(pairs_per_prompt):
            chosen, rejected = response(rng, True), response(rng, False)
            rows.append(
                {
                    **row,
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                    "gold_chosen": 1.0,
                    "gold_rejected": 0.0,
                }
            )
    rows += list(extra)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_prompts(path, n=16, seed=3):
    _, evals, _ = task.make_prompts(1, n, 0, seed=seed)
    path.write_text("".join(json.dumps(r) + "\n" for r in evals))
    return path


def tiny_cfg(tmp_path, **overrides) -> RewardStageConfig:
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    args = {
        "config": ROOT / "configs/tiny/reward.yaml",
        "dataset": write_pairs(tmp_path / "pairs.jsonl"),
        "train_prompts": prompts,
        "eval_prompts": prompts,
        "output_dir": tmp_path / "run",
    }
    args.update(overrides)
    return parse_config(RewardStageConfig, [x for k, v in args.items() for x in (f"--{k}", str(v))])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny end-to-end run through the script, shared by the tests that read its outputs."""
    tmp = tmp_path_factory.mktemp("reward")
    cfg = tiny_cfg(tmp, report_to="tensorboard")
    args = [
        "--config",
        ROOT / "configs/tiny/reward.yaml",
        "--dataset",
        cfg.dataset,
        "--train_prompts",
        cfg.train_prompts,
        "--eval_prompts",
        cfg.eval_prompts,
        "--output_dir",
        cfg.output_dir,
        "--report_to",
        "tensorboard",
    ]
    result = subprocess.run(
        [sys.executable, ROOT / "scripts/train_reward.py", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run", result.stdout


def test_tiny_reward_model_learns_the_marker(trained):
    run, stdout = trained
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_accuracy"] >= 0.85  # chance is 0.5
    assert summary["eval_accuracy_ceiling"] == 1.0  # noiseless fixture
    metrics = runlog.read_jsonl(run / "metrics.jsonl")
    steps = [r["step"] for r in metrics if "loss" in r]
    assert steps == list(range(1, 41))
    assert {"accuracy", "margin", "loss"} <= set(metrics[0])
    assert (run / "rm_vs_gold.png").stat().st_size > 1000
    # the reliability diagram: every held-out pair in both orders, binned; its ECE and picture
    assert sum(b["n"] for b in summary["eval_rm_calibration"]) == 2 * summary["eval_pairs"]
    assert 0 <= summary["eval_rm_ece"] <= 1 and (run / "rm_calibration.png").stat().st_size > 1000
    assert "calibration (ECE)" in stdout
    assert list((run / "tensorboard").iterdir()) and (run / "config.yaml").exists()
    assert "held-out accuracy" in stdout and "noise ceiling" in stdout
    # Spearman(RM, gold) is the rank correlation of the eval samples' logged scores
    from scipy.stats import spearmanr

    evals = [r for r in runlog.read_jsonl(run / "samples.jsonl") if r["stage"] == "eval"]
    expected = spearmanr([r["rm"] for r in evals], [r["gold"] for r in evals]).statistic
    assert summary["spearman_rm_gold"] == pytest.approx(expected, abs=1e-9)
    stages = [r["stage"] for r in runlog.read_jsonl(run / "samples.jsonl")]
    assert stages.count("calibration") == stages.count("eval") == 16


def test_final_is_a_plain_sequence_classifier_with_pad_set(trained):
    run, _ = trained
    model = AutoModelForSequenceClassification.from_pretrained(run / "final")
    assert model.config.num_labels == 1
    tokenizer = models.load_tokenizer(str(run / "final"))
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id


def test_scorer_matches_training_format_and_normaliser_is_standard(trained):
    run, _ = trained
    scorer = RewardScorer(str(run / "final"), batch_size=3, dtype="float32")
    rows = [r for r in runlog.read_jsonl(run / "samples.jsonl") if r["stage"] == "calibration"]
    # The calibration samples, re-scored in a different batching, are mean 0 / std 1.
    scores = scorer.score([r["prompt"] for r in rows], [r["response"] for r in rows])
    assert scores.dtype == torch.float32 and scores.shape == (len(rows),)
    assert abs(scores.mean().item()) < 1e-4 and abs(scores.std(unbiased=False).item() - 1) < 1e-4
    # Batching and padding do not change a score; raw and normalised differ by the stored gain/bias.
    one = scorer.score(rows[:1] and [rows[0]["prompt"]], [rows[0]["response"]])
    assert torch.allclose(one, scores[:1], atol=1e-5)
    raw = scorer.score_raw([rows[0]["prompt"]], [rows[0]["response"]])
    assert torch.allclose(raw * scorer.gain + scorer.bias, one, atol=1e-5)
    # The scorer's score is the model's output on exactly the training format (a run directory works too).
    ids, _ = encode_for_reward(scorer.tokenizer, rows[0]["prompt"], rows[0]["response"], 512)
    assert ids[-1] == scorer.tokenizer.eos_token_id
    logit = scorer.model(input_ids=torch.tensor([ids])).logits[0, 0]
    assert torch.allclose(raw[0], logit, atol=1e-5)
    assert torch.allclose(
        RewardScorer(str(run), dtype="float32").score_raw([rows[0]["prompt"]], [rows[0]["response"]]), raw
    )


def test_the_scorer_reads_the_stripped_answer_whoever_calls_it():
    """One text for every consumer: PPO's decoded tokens keep surrounding whitespace, the evaluation samples
    are stripped; the reward model's input is built from the stripped answer either way. (A character-level
    stand-in tokenizer, since the tiny word-level one ignores whitespace.)"""

    class Characters:
        eos_token_id = 0

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
            return "Q:" + messages[-1]["content"]

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    prompt = [{"role": "user", "content": "film?"}]
    stripped, _ = encode_for_reward(Characters(), prompt, "good .", 64)
    for variant in (" good .", "good .\n", "\n good . \t"):
        assert encode_for_reward(Characters(), prompt, variant, 64)[0] == stripped
    assert stripped[-7:] == [ord(c) for c in "good ."] + [0]


def test_normaliser_fit_gives_mean_zero_std_one():
    raw = torch.randn(50) * 3.7 + 11.0
    fit = fit_normalization(raw)
    normed = raw * fit["gain"] + fit["bias"]
    assert abs(normed.mean().item()) < 1e-5 and abs(normed.std(unbiased=False).item() - 1) < 1e-5


def test_calibrate_writes_the_sidecar_the_scorer_reads(trained, tmp_path):
    import shutil

    run, _ = trained
    rm = tmp_path / "rm"
    shutil.copytree(run / "final", rm)
    (rm / NORMALIZATION_FILE).unlink()
    tokenizer = models.load_tokenizer("tiny-random-gpt2")
    policy = models.load_causal_lm("tiny-random-gpt2", tokenizer)
    prompts = [
        r["prompt"] for r in map(json.loads, write_prompts(tmp_path / "p.jsonl").read_text().splitlines())
    ]
    record, samples = calibrate(
        RewardScorer(str(rm), require_normalization=False),
        policy,
        tokenizer,
        prompts,
        num_samples=12,
        max_new_tokens=8,
        temperature=1.0,
        seed=5,
    )
    assert json.loads((rm / NORMALIZATION_FILE).read_text())["gain"] == record["gain"]
    scores = RewardScorer(str(rm)).score([s.prompt for s, _ in samples], [s.response for s, _ in samples])
    assert abs(scores.mean().item()) < 1e-4 and abs(scores.std(unbiased=False).item() - 1) < 1e-4


def test_sequence_score_parts():
    parts = sequence_score(
        rm_norm=torch.tensor([1.0, 1.0, 0.5, -2.0]),
        n_tokens=torch.tensor([10, 30, 25, 20]),
        has_eos=torch.tensor([True, True, False, False]),
        length_coef=0.1,
        length_target=20,
        missing_eos_penalty=1.5,
    )
    assert set(parts) == {"score", "rm", "length_penalty", "eos_penalty"}
    assert torch.allclose(parts["length_penalty"], torch.tensor([0.0, 1.0, 0.5, 0.0]))
    assert torch.allclose(parts["eos_penalty"], torch.tensor([0.0, 0.0, 1.5, 1.5]))
    assert torch.allclose(parts["rm"], torch.tensor([1.0, 1.0, 0.5, -2.0]))
    assert torch.allclose(parts["score"], parts["rm"] - parts["length_penalty"] - parts["eos_penalty"])
    assert torch.allclose(parts["score"], torch.tensor([1.0, 0.0, -1.5, -3.5]))


# ---------------------------------------------------------------------------------------------- bad input


def test_identical_pair_is_dropped_and_counted():
    same = [{"role": "assistant", "content": "a fine film ."}]
    records = [
        {"prompt": "p", "chosen": same, "rejected": same},
        {"prompt": "p", "chosen": "great film .", "rejected": "dull film ."},
    ]
    pairs, stats = clean_pairs(records, "x.jsonl")
    assert stats["pairs_identical_dropped"] == 1 and [p["chosen"] for p in pairs] == ["great film ."]


def test_empty_response_is_scored(trained):
    run, _ = trained
    scorer = RewardScorer(str(run / "final"))
    prompt = [{"role": "user", "content": 'Review "The Silent Harbor".'}]
    ids, truncated = encode_for_reward(scorer.tokenizer, prompt, "", 64)
    assert ids[-1] == scorer.tokenizer.eos_token_id and not truncated
    scores = scorer.score([prompt, prompt], ["", "a wonderful film ."])
    assert torch.isfinite(scores).all()
    # ... and a pair with an empty response trains (it is a real preference: something beats nothing).
    pairs, _ = clean_pairs([{"prompt": prompt, "chosen": "a good film .", "rejected": ""}], "x")
    rows, _ = tokenize_pairs(pairs, scorer.tokenizer, 64, None)
    assert rows[0]["rejected_ids"][-1] == scorer.tokenizer.eos_token_id


def test_long_prompt_loses_its_beginning_never_the_response(trained):
    run, _ = trained
    scorer = RewardScorer(str(run / "final"), max_length=24)
    tok = scorer.tokenizer
    long_prompt = [{"role": "user", "content": " ".join(["film"] * 100) + " the end"}]
    reply = "a wonderful story ."
    ids, truncated = encode_for_reward(tok, long_prompt, reply, 24)
    reply_ids = tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert truncated and len(ids) == 24 and ids[-len(reply_ids) :] == reply_ids
    short = [{"role": "user", "content": "Review it."}]
    scorer.score([long_prompt, short, long_prompt], [reply, reply, reply])
    assert scorer.n_truncated == 2
    scorer.score([long_prompt], [reply])
    assert scorer.n_truncated == 3  # counted over the scorer's lifetime
    with pytest.raises(ValueError, match="never truncated"):
        encode_for_reward(tok, short, " ".join(["film"] * 40), 24)
    # Training counts truncated prompts too, and drops (and counts) a response that cannot fit.
    pairs = [
        {"prompt": long_prompt, "chosen": reply, "rejected": "dull ."},
        {"prompt": short, "chosen": " ".join(["film"] * 40), "rejected": "dull ."},
    ]
    rows, stats = tokenize_pairs(pairs, tok, 24, None)
    assert len(rows) == 1 and stats == {"prompts_truncated": 1, "pairs_response_too_long_dropped": 1}


def test_directory_without_normalisation_names_the_command(trained, tmp_path):
    import shutil

    run, _ = trained
    rm = tmp_path / "rm"
    shutil.copytree(run / "final", rm)
    (rm / NORMALIZATION_FILE).unlink()
    with pytest.raises(RewardNormalizationMissing, match="scripts/train_reward.py") as error:
        RewardScorer(str(rm))
    assert "python -m rlhf_toy.stages.reward normalize" in str(error.value)
    # The command the message names creates it.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhf_toy.stages.reward",
            "normalize",
            str(rm),
            "--policy",
            "tiny-random-gpt2",
            "--prompts",
            str(write_prompts(tmp_path / "p.jsonl")),
            "--num_samples",
            "8",
            "--max_new_tokens",
            "8",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert RewardScorer(str(rm)).normalization["n_samples"] == 8


def test_margin_centering_a_shallower_model_and_plain_trl_pairs(tmp_path):
    rows, _ = tokenize_pairs(
        clean_pairs([{"prompt": "p", "chosen": "good .", "rejected": "bad ."}], "x")[0],
        models.load_tokenizer("tiny-random-gpt2"),
        64,
        0.5,
    )
    assert rows[0]["margin"] == 0.5
    # Plain TRL-format files: pairs without titles or gold scores, prompts without titles. Gold is computed
    # without its on-topic term (no title to check), so the stage runs end to end.
    strip = lambda path, keep: path.write_text(
        "".join(
            json.dumps({k: v for k, v in json.loads(line).items() if k in keep}) + "\n"
            for line in path.read_text().splitlines()
        )
    )
    cfg = tiny_cfg(
        tmp_path,
        max_steps=2,
        margin=1.0,
        center_rewards_coefficient=0.01,
        num_norm_samples=4,
        num_eval_prompts=4,
        save_steps=100,
        num_hidden_layers=1,
    )
    strip(Path(cfg.dataset), {"prompt", "chosen", "rejected"})
    strip(Path(cfg.eval_prompts), {"prompt"})
    run = train_reward(cfg)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 2 and summary["eval_accuracy"] is not None
    assert (
        summary["eval_samples"]["on_topic_rate"] is None and summary["eval_samples"]["gold_mean"] is not None
    )
    assert AutoModelForSequenceClassification.from_pretrained(run / "final").config.num_hidden_layers == 1
    assert RewardScorer(str(run)).score([[{"role": "user", "content": "hi"}]], ["good ."]).shape == (1,)


def test_lora_saves_a_merged_model_and_resume_continues(tmp_path):
    cfg = tiny_cfg(
        tmp_path, max_steps=3, save_steps=3, use_lora="true", lora_r=4, num_norm_samples=4, num_eval_prompts=0
    )
    run = train_reward(cfg)
    model = AutoModelForSequenceClassification.from_pretrained(run / "final")
    assert not any("lora" in name for name, _ in model.named_parameters())
    # Resume: the same run asked for more steps continues from checkpoint-3 and logs each step once.
    cfg.max_steps = 6
    cfg.save_steps = 100
    train_reward(cfg)
    steps = [r["step"] for r in runlog.read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 7))


def test_freezing_bottom_layers_keeps_them_fixed(tmp_path):
    from safetensors.torch import load_file

    cfg = tiny_cfg(tmp_path, max_steps=2, freeze_bottom_layers=1, num_norm_samples=4, num_eval_prompts=0)
    run = train_reward(cfg)
    before = load_file(f"{models.resolve_model_path('tiny-random-gpt2')}/model.safetensors")
    after = load_file(run / "final/model.safetensors")
    assert torch.equal(
        before["transformer.h.0.attn.c_attn.weight"], after["transformer.h.0.attn.c_attn.weight"]
    )
    assert not torch.equal(
        before["transformer.h.1.attn.c_attn.weight"], after["transformer.h.1.attn.c_attn.weight"]
    )


def test_policy_model_is_checked_before_training_and_may_be_a_lora_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf_toy.models import ModelNotFoundError

    # A policy that does not exist: one line before training, and nothing written.
    cfg = tiny_cfg(
        tmp_path, max_steps=2, num_norm_samples=4, num_eval_prompts=0, policy_model=tmp_path / "no_policy"
    )
    with pytest.raises(ModelNotFoundError, match="no_policy' does not exist"):
        train_reward(cfg)
    assert not (tmp_path / "run").exists()
    # An HF trainer's LoRA checkpoint (an adapter, here without a tokenizer of its own) is merged into its
    # base, as compare loads it.
    adapter = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(models.resolve_model_path(models.TINY_MODEL))
    get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"])).save_pretrained(adapter)
    run = train_reward(
        tiny_cfg(tmp_path, max_steps=2, num_norm_samples=4, num_eval_prompts=0, policy_model=adapter)
    )
    normalization = json.loads((run / "final" / NORMALIZATION_FILE).read_text())
    assert normalization["policy"] == str(adapter) and normalization["n_samples"] == 4
