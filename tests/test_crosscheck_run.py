"""Run-level cross-check (ours vs TRL's PPOTrainer) on the tiny random GPT-2: the report, the PNG and
both trainers' curves exist; the RM copy given to TRL scores exactly as our normalised RewardScorer."""

import json
import math
import os

import pytest
import torch
from conftest import ROOT

from rlhf_toy import data, models, sequences
from rlhf_toy.verify.trl_run import CURVES, make_tiny_reward_model, normalised_reward_model_for_trl


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    return make_tiny_reward_model(tmp_path_factory.mktemp("rm") / "rm", gain=2.0, bias=0.5)


def test_folded_reward_model_matches_normalised_scorer(tiny_rm):
    """TRL's get_reward on the folded copy (left padding, score at the EOS) == RewardScorer.score."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.utils import get_reward

    from rlhf_toy.scoring import RewardScorer

    tok = models.load_tokenizer(models.TINY_MODEL)
    prompts = data.load_prompts(str(ROOT / "data/prompts_eval.jsonl"))[:3]
    texts = ["the film was great", "a dull story", "wonderful acting and music , really"]
    queries, _, _ = sequences.encode_prompts(tok, prompts, 48)
    resp = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(map(len, resp))
    responses = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in resp])
    rm = normalised_reward_model_for_trl(tiny_rm, torch.float32, 2.0, 0.5)
    with torch.no_grad():
        _, trl_scores, _ = get_reward(
            rm, torch.cat([queries, responses], 1), tok.pad_token_id, queries.shape[1]
        )
    ours = RewardScorer(str(tiny_rm), device="cpu", dtype="float32").score(prompts, texts)
    assert torch.allclose(trl_scores, ours, atol=1e-4), (trl_scores, ours)


def test_tiny_run_level_crosscheck(tiny_rm, tmp_path, run_script):
    out = tmp_path / "report"
    result = run_script(
        "crosscheck_trl",
        "--config",
        ROOT / "configs/tiny/crosscheck.yaml",
        "--reward_model_path",
        tiny_rm,
        "--output_dir",
        out,
        "--work_dir",
        tmp_path / "work",
        "--total_episodes",
        24,
        "--num_eval_prompts",
        4,
        timeout=240,
    )
    assert "Run-level cross-check" in result.stdout
    md = (out / "crosscheck.md").read_text()
    assert "TRL after" in md and "ours after" in md and "episodes/s" in md
    assert "Environment: dtype float32 on cpu" in md  # the tiny config pins float32, whatever the CPU
    assert (out / "crosscheck.png").stat().st_size > 10_000
    report = json.loads((out / "crosscheck.json").read_text())
    assert report["same_prompt_batches"] is True
    for side in ("ours", "trl"):
        hist = report[side]["history"]
        assert [h["step"] for h in hist] == [1, 2, 3]
        # reward, KL, entropy, clip fraction: a value every step, both trainers, each in its range
        for key, _ in CURVES[:4]:
            assert all(math.isfinite(h[key]) for h in hist), (side, key)
        assert all(h[CURVES[2][0]] > 0 and 0 <= h[CURVES[3][0]] <= 1 for h in hist), side
        assert report[side]["eval_after"]["gold_mean"] is not None
        assert report[side]["throughput"]["episodes_per_s"] > 0
    assert report["ours"]["eval_before"]["kl_to_ref"] == pytest.approx(0.0, abs=1e-5)
    # Both trainers start from the same policy and reference: at step 1, before any update, both measure
    # a KL of ~0 on the same prompts; and they update at the same (matched, linearly decaying) learning rate
    for side in ("ours", "trl"):
        assert abs(report[side]["history"][0]["objective/kl"]) < 1e-3, side
    ours_lr = [h["lr"] for h in report["ours"]["history"]]
    trl_lr = [h["lr"] for h in report["trl"]["history"]]
    assert ours_lr == pytest.approx(trl_lr, rel=1e-6) and ours_lr[0] > ours_lr[-1]
