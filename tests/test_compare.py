import json
import math
import statistics

import pytest
import torch
import yaml
from test_dpo import make_tiny_reward_model, write_preferences
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_toy import models, runlog, task
from rlhf_toy.evaluation import compare

SAMPLING = ["--limit", "6", "--max_new_tokens", "12", "--batch_size", "4", "--n_bootstrap", "200"]


def tiny_copy(path, noise: float = 0.0, seed: int = 0, extra_token: str | None = None):
    """The tiny model saved at `path`, its weights optionally perturbed (a stand-in for a trained run)."""
    source = models.resolve_model_path(models.TINY_MODEL)
    model = AutoModelForCausalLM.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if noise:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn(p.shape, generator=generator))
    if extra_token:
        tokenizer.add_tokens([extra_token])
        model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def fake_ppo_run(root):
    """A run directory as the PPO stage leaves it: final/, checkpoints/step-N/policy/, metrics, config."""
    run = root / "ppo"
    tiny_copy(run / "final", noise=0.05, seed=1)
    tiny_copy(run / "checkpoints/step-2/policy", noise=0.02, seed=2)
    tiny_copy(run / "checkpoints/step-3/policy", noise=0.05, seed=1)  # the final weights: not sampled twice
    for step in (2, 3):  # a PPO checkpoint is complete once its trainer state is written
        (run / f"checkpoints/step-{step}/trainer_state.pt").write_bytes(b"")
    runlog.append_jsonl(
        run / "metrics.jsonl",
        [
            {"step": s, "objective/scores": 0.1 * s, "objective/kl": 0.5 * s, "score/gold": 0.2 - 0.01 * s}
            for s in (1, 2, 3)
        ],
    )
    (run / "config.yaml").write_text(
        yaml.safe_dump({"length_coef": 0.02, "length_target": 8, "missing_eos_penalty": 1.0})
    )
    return run


@pytest.fixture
def setup(tmp_path):
    _, prompts = write_preferences(tmp_path)
    return {
        "prompts": prompts,
        "ref": tiny_copy(tmp_path / "sft_final"),
        "rm": make_tiny_reward_model(tmp_path / "rm"),
    }


def test_compare_writes_every_file_and_metric_and_self_comparison_is_exact(tmp_path, setup):
    ppo = fake_ppo_run(tmp_path)
    same = tiny_copy(tmp_path / "same_weights")  # the reference's weights at another path
    out = tmp_path / "report"
    compare.main(
        [
            "--runs",
            str(ppo),
            f"twin={same}",
            "base",
            "--base",
            models.TINY_MODEL,
            "--ref",
            str(setup["ref"]),
            "--prompts",
            str(setup["prompts"]),
            "--output_dir",
            str(out),
            "--reward_model",
            str(setup["rm"]),
            "--samples_per_prompt",
            "2",
            *SAMPLING,
        ]
    )
    for name in ("compare.json", "compare.md", "frontier.png", "curves.png", "report.html"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "compare.json").read_text())
    assert list(report["runs"]) == ["ppo", "twin", "base"]
    for label, m in report["runs"].items():
        for key in (
            "gold_mean",
            "rm_mean",
            "score_mean",
            "kl_to_ref",
            "win_rate_vs_ref",
            "win_rate_vs_ref_ci95",
            "length_mean",
            "eos_rate",
            "distinct_2",
            "corpus_distinct_2",
            "on_topic_rate",
            "flattery_rate",
        ):
            assert m[key] is not None, (label, key)
        assert m["n_samples"] == 12
    # A model compared with itself (same weights, computed the long way): identical samples, exact tie.
    twin = report["runs"]["twin"]
    assert twin["win_rate_vs_ref"] == 0.5 and twin["win_rate_vs_ref_ci95"] == [0.5, 0.5]
    assert abs(twin["kl_to_ref"]) < 1e-4
    ppo_m = report["runs"]["ppo"]
    assert ppo_m["kl_to_ref"] > 0.01
    assert [c["label"] for c in ppo_m["checkpoints"]] == ["ppo@2"]
    assert report["penalties"] == {"length_coef": 0.02, "length_target": 8, "missing_eos_penalty": 1.0}

    # The numbers by hand, from the scored samples.
    rows = runlog.read_jsonl(out / "samples/ppo.jsonl")
    ref_rows = {
        (r["prompt_id"], r["sample"]): r for r in runlog.read_jsonl(out / "samples/ref_sft_final.jsonl")
    }
    titles = [json.loads(line)["title"] for line in setup["prompts"].read_text().splitlines()]
    assert ppo_m["gold_mean"] == pytest.approx(
        statistics.mean(task.gold_score(r["response"], titles[r["prompt_id"]]) for r in rows)
    )
    parts = [task.gold_parts(r["response"], titles[r["prompt_id"]]) for r in rows]
    assert ppo_m["on_topic_rate"] == pytest.approx(statistics.mean(p["on_topic"] for p in parts))
    assert ppo_m["flattery_rate"] == pytest.approx(
        statistics.mean(p["flattery_reason"] is not None for p in parts)
    )
    assert ppo_m["junk_rate"] == pytest.approx(statistics.mean(bool(p["flags"]) for p in parts))
    flags = {f for p in parts for f in p["flags"]}
    assert {k: v for k, v in ppo_m.items() if k.startswith("junk/")} == pytest.approx(
        {f"junk/{f}": statistics.mean(f in p["flags"] for p in parts) for f in flags}
    )
    if flags:  # compare.md's per-kind table names each flag found
        assert all(f in (out / "compare.md").read_text() for f in flags)
    assert ppo_m["eos_rate"] == pytest.approx(statistics.mean(r["has_eos"] for r in rows))
    assert ppo_m["kl_to_ref"] == pytest.approx(statistics.mean(r["logp"] - r["ref_logp"] for r in rows))
    per_prompt = {}
    for r in rows:
        other = ref_rows[(r["prompt_id"], r["sample"])]["gold"]
        per_prompt.setdefault(r["prompt_id"], []).append(
            1.0 if r["gold"] > other else 0.5 if r["gold"] == other else 0.0
        )
    assert ppo_m["win_rate_vs_ref"] == pytest.approx(
        statistics.mean(statistics.mean(v) for v in per_prompt.values())
    )
    lo, hi = ppo_m["win_rate_vs_ref_ci95"]
    assert lo <= ppo_m["win_rate_vs_ref"] <= hi
    bigrams = [
        [tuple(w[i : i + 2]) for i in range(len(w) - 1)]
        for r in rows
        for w in [r["response"].lower().split()]
    ]
    pooled = [b for answer in bigrams for b in answer]
    assert ppo_m["corpus_distinct_2"] == pytest.approx(len(set(pooled)) / len(pooled))
    assert ppo_m["distinct_2"] == pytest.approx(
        statistics.mean(len(set(a)) / len(a) if a else 0.0 for a in bigrams)
    )
    for r in rows:  # score = RM − length penalty − EOS penalty, with the PPO run's settings
        assert r["length_penalty"] == pytest.approx(0.02 * max(0, r["n_tokens"] - 8))
        assert r["score"] == pytest.approx(r["rm"] - r["length_penalty"] - (0.0 if r["has_eos"] else 1.0))

    md = (out / "compare.md").read_text()
    assert "| ppo |" in md and "| ppo@2 |" in md and "temperature" in md and "bootstrap" in md
    # What the numbers depend on besides the code: the resolved precision, the hardware, versions, commit.
    environment = report["environment"]
    assert environment["dtype"] == models.resolve_precision("auto", torch.device("cpu")).name
    assert environment["cpu_native_bf16"] == models.cpu_has_native_bf16()
    assert {"torch", "transformers", "trl", "commit"} <= set(environment)
    assert f"Environment: dtype {environment['dtype']}" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<th>twin</th>" in page
    assert (
        json.loads(setup["prompts"].read_text().splitlines()[0])["prompt"][0]["content"].split('"')[0] in page
    )


def test_compare_without_reward_model_and_with_a_different_tokenizer(tmp_path, setup, capsys):
    other = tiny_copy(tmp_path / "other_tok", extra_token="zzzz")
    out = tmp_path / "report"
    compare.main(
        [
            "--runs",
            str(setup["ref"]),
            str(other),
            "--prompts",
            str(setup["prompts"]),
            "--output_dir",
            str(out),
            "--reward_model",
            "none",
            "--checkpoints",
            "0",
            *SAMPLING,
        ]
    )
    report = json.loads((out / "compare.json").read_text())
    assert report["ref"] == "sft_final"  # default: the first run
    m = report["runs"]["other_tok"]
    assert m["rm_mean"] is None and m["kl_to_ref"] is None and m["gold_mean"] is not None
    assert "tokenizer differs" in m["kl_note"] and "'zzzz'" in m["kl_note"]
    md = (out / "compare.md").read_text()
    assert "tokenizer differs" in md and "no reward model given" in md
    assert "tokenizer differs" in capsys.readouterr().err


def test_compare_rejects_bad_input_with_a_clear_message(tmp_path, setup, capsys):
    empty_run = tmp_path / "runs/unfinished"
    (empty_run / "checkpoints").mkdir(parents=True)
    (empty_run / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        compare.main(
            [
                "--runs",
                str(empty_run),
                "--prompts",
                str(setup["prompts"]),
                "--output_dir",
                str(tmp_path / "r"),
            ]
        )
    assert exit_info.value.code == 2 and "holds no model" in capsys.readouterr().err

    bad = tmp_path / "bad_prompts.jsonl"
    bad.write_text(setup["prompts"].read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(SystemExit) as exit_info:
        compare.main(
            ["--runs", str(setup["ref"]), "--prompts", str(bad), "--output_dir", str(tmp_path / "r")]
        )
    assert exit_info.value.code == 2 and "bad_prompts.jsonl:2" in capsys.readouterr().err


def test_compare_bad_arguments_are_one_line_errors_before_anything_is_written(tmp_path, setup, capsys):
    out = tmp_path / "r"
    argv = ["--runs", str(setup["ref"]), "--prompts", str(setup["prompts"]), "--output_dir", str(out)]
    for extra, message in (
        (["--limit", "-1"], "error: argument --limit: must be >= 0, got -1"),
        (["--n_bootstrap", "0"], "error: argument --n_bootstrap: must be >= 100, got 0"),
        (["--temperature", "0"], "error: argument --temperature: must be a finite number > 0, got 0"),
        (["--temperature", "nan"], "error: argument --temperature: must be a finite number > 0, got nan"),
        (
            ["--reward_model", str(tmp_path / "rm_typo")],
            f"error: --reward_model {tmp_path / 'rm_typo'}: no reward model there",
        ),
        (["--dtype", "fp16"], "error: argument --dtype: invalid choice: 'fp16'"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            compare.main(argv + extra)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert not out.exists()


def test_a_run_used_through_its_checkpoint_keeps_its_penalties(tmp_path, setup):
    import shutil

    ppo = fake_ppo_run(tmp_path)
    shutil.rmtree(ppo / "final")  # an unfinished run: its newest checkpoint stands in
    for i, run in enumerate([ppo, ppo / "checkpoints/step-2/policy"]):  # or a checkpoint named directly
        out = tmp_path / f"report{i}"
        compare.main(
            [
                "--runs",
                str(run),
                "--ref",
                str(setup["ref"]),
                "--prompts",
                str(setup["prompts"]),
                "--output_dir",
                str(out),
                "--reward_model",
                str(setup["rm"]),
                "--checkpoints",
                "0",
                *SAMPLING,
            ]
        )
        report = json.loads((out / "compare.json").read_text())
        assert report["penalties"] == {"length_coef": 0.02, "length_target": 8, "missing_eos_penalty": 1.0}, (
            run
        )


def test_compare_resumes_from_the_samples_it_has(tmp_path, setup):
    run = tiny_copy(tmp_path / "run_final", noise=0.05)
    out = tmp_path / "report"
    argv = [
        "--runs",
        str(run),
        "--ref",
        str(setup["ref"]),
        "--prompts",
        str(setup["prompts"]),
        "--output_dir",
        str(out),
        "--reward_model",
        "none",
        *SAMPLING,
    ]
    compare.main(argv)
    first = json.loads((out / "compare.json").read_text())
    samples = out / "samples/run_final.jsonl"
    lines = samples.read_text().splitlines()
    assert len(lines) == 6
    # As if killed during the second batch: the first batch (4 rows, one marked) and half a line remain.
    kept = [json.loads(line) for line in lines[:4]]
    kept[0]["response"] += " MARK"
    samples.write_text("".join(json.dumps(r) + "\n" for r in kept) + lines[4][:20])
    (out / "compare.json").unlink()
    compare.main(argv)
    rows = runlog.read_jsonl(samples)
    assert rows[0]["response"].endswith(" MARK")  # kept, not resampled
    assert [r["response"] for r in rows[1:]] == [json.loads(line)["response"] for line in lines[1:]]
    again = json.loads((out / "compare.json").read_text())
    assert again["runs"]["run_final"]["kl_to_ref"] == first["runs"]["run_final"]["kl_to_ref"]
    # A fresh clone has the committed samples but no stamps (*.meta.json are git-ignored): it resamples
    # rather than trust samples it cannot tie to the weights on this machine.
    for meta in (out / "samples").glob("*.meta.json"):
        meta.unlink()
    compare.main(argv)
    rows = runlog.read_jsonl(samples)
    assert len(rows) == 6 and not rows[0]["response"].endswith(" MARK")
    assert [r["response"] for r in rows] == [json.loads(line)["response"] for line in lines]


def test_compare_loads_lora_adapter_checkpoints(tmp_path, setup):
    """An HF trainer's LoRA checkpoint holds only an adapter: it is merged into its base to be sampled."""
    from peft import LoraConfig, get_peft_model

    run = tmp_path / "dpo"
    tiny_copy(run / "final", noise=0.05)
    base = AutoModelForCausalLM.from_pretrained(setup["ref"])
    adapter = run / "checkpoints/checkpoint-1"
    get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"])).save_pretrained(
        adapter
    )  # B = 0: the base's function
    AutoTokenizer.from_pretrained(setup["ref"]).save_pretrained(adapter)
    (adapter / "trainer_state.json").write_text("{}")  # an HF checkpoint is complete once this is written
    runlog.append_jsonl(run / "metrics.jsonl", [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6}])
    out = tmp_path / "report"
    compare.main(
        [
            "--runs",
            str(run),
            "--ref",
            str(setup["ref"]),
            "--prompts",
            str(setup["prompts"]),
            "--output_dir",
            str(out),
            "--reward_model",
            "none",
            *SAMPLING,
        ]
    )
    checkpoint = json.loads((out / "compare.json").read_text())["runs"]["dpo"]["checkpoints"][0]
    assert checkpoint["label"] == "dpo@1" and checkpoint["step"] == 1
    # the reference's function: KL 0, within bf16's rounding where `auto` is bf16 (the sampler's log-probs of its
    # tokens against the reference's forward pass; the merged run, 0.05 of noise away, is at 1.3)
    assert abs(checkpoint["kl_to_ref"]) < 1e-2 and checkpoint["win_rate_vs_ref"] == 0.5


def test_compare_splits_pairs_and_best_of_n(tmp_path, setup):
    """Two prompt files are two splits (the last one's tables up front); every run is paired with every other;
    bon:N ranks the reference's samples by the RM, bon:2's candidates are the first two of bon:4's."""
    lines = setup["prompts"].read_text().splitlines()
    (tmp_path / "prompts_eval.jsonl").write_text("\n".join(lines[:3]) + "\n")
    (tmp_path / "prompts_test.jsonl").write_text("\n".join(lines[3:7]) + "\n")
    ppo, out = fake_ppo_run(tmp_path), tmp_path / "report"
    compare.main(
        [
            "--runs",
            "base",
            str(setup["ref"]),
            str(ppo),
            "bon:2",
            "bon:4",
            "--base",
            models.TINY_MODEL,
            "--ref",
            str(setup["ref"]),
            "--prompts",
            str(tmp_path / "prompts_eval.jsonl"),
            str(tmp_path / "prompts_test.jsonl"),
            "--output_dir",
            str(out),
            "--reward_model",
            str(setup["rm"]),
            "--checkpoints",
            "0",
            "--max_new_tokens",
            "12",
            "--batch_size",
            "4",
            "--n_bootstrap",
            "200",
        ]
    )
    report = json.loads((out / "compare.json").read_text())
    assert report["settings"]["headline_split"] == "test" and set(report["splits"]) == {"eval", "test", "all"}
    assert report["runs"] == report["splits"]["test"]["runs"]
    assert [report["splits"][s]["n_prompts"] for s in ("eval", "test", "all")] == [3, 4, 7]
    assert report["runs"]["ppo"]["n_samples"] == 4
    # every pair once, the later run first: 5 runs, 10 pairs; a run against itself would be an exact tie
    pairs = {(p["a"], p["b"]): p for p in report["pairs"]}
    assert len(pairs) == 10 and ("ppo", "sft_final") in pairs and ("bon:4", "ppo") in pairs
    ppo_rows = {
        r["prompt_id"]: r["gold"] for r in runlog.read_jsonl(out / "samples/ppo.jsonl") if r["prompt_id"] >= 3
    }
    ref_rows = {
        r["prompt_id"]: r["gold"]
        for r in runlog.read_jsonl(out / "samples/sft_final.jsonl")
        if r["prompt_id"] >= 3
    }
    p = pairs[("ppo", "sft_final")]
    assert p["gold_diff"] == pytest.approx(statistics.mean(ppo_rows[i] - ref_rows[i] for i in ppo_rows))
    lo, hi = p["gold_diff_ci95"]
    assert lo <= p["gold_diff"] <= hi and p["significant"] == (lo > 0 or hi < 0)
    # best-of-N: the candidate with the highest RM score, analytic KL, candidates shared
    candidates = runlog.read_jsonl(out / "samples/ref-candidates.jsonl")
    assert len(candidates) == 7 * 4
    for n in (2, 4):
        m = report["splits"]["all"]["runs"][f"bon:{n}"]
        assert m["kl_to_ref"] == pytest.approx(math.log(n) - (n - 1) / n)
        best = [
            max((c for c in candidates if c["prompt_id"] == i and c["sample"] < n), key=lambda c: c["rm"])
            for i in range(7)
        ]
        assert m["rm_mean"] == pytest.approx(statistics.mean(c["rm"] for c in best))
        assert m["gold_mean"] == pytest.approx(statistics.mean(c["gold"] for c in best))
    first = [
        c["response"] for c in candidates if c["sample"] == 0
    ]  # candidate 0 is the reference's own answer
    assert first == [
        r["response"]
        for r in sorted(runlog.read_jsonl(out / "samples/sft_final.jsonl"), key=lambda r: r["prompt_id"])
    ]
    md = (out / "compare.md").read_text()
    assert (
        "## test prompts (4): the headline numbers" in md
        and "## eval prompts (3)" in md
        and "## all prompts (7)" in md
    )
    assert "| ppo − sft_final |" in md and "no correction for the 10 comparisons" in md
    assert "| bon:4 |" in md and "the analytic log N − (N−1)/N" in md


def test_compare_prompts_without_titles_run_with_rm_only_columns(tmp_path, setup):
    """A prompts file in TRL's format without titles: no on-topic term, on_topic_rate null, all else as usual."""
    plain = tmp_path / "plain.jsonl"
    plain.write_text(
        "".join(
            json.dumps({"prompt": json.loads(line)["prompt"]}) + "\n"
            for line in setup["prompts"].read_text().splitlines()
        )
    )
    out = tmp_path / "report"
    compare.main(
        [
            "--runs",
            str(setup["ref"]),
            "--prompts",
            str(plain),
            "--output_dir",
            str(out),
            "--reward_model",
            str(setup["rm"]),
            "--checkpoints",
            "0",
            *SAMPLING,
        ]
    )
    m = json.loads((out / "compare.json").read_text())["runs"]["sft_final"]
    assert m["on_topic_rate"] is None and m["rm_mean"] is not None and m["flattery_rate"] is not None
    assert "| sft_final |" in (out / "compare.md").read_text()


def test_compare_rejects_bad_best_of_n(tmp_path, setup, capsys):
    for runs, reward_model, message in (
        ([str(setup["ref"]), "bon:0"], str(setup["rm"]), "bon:N with N a positive integer"),
        ([str(setup["ref"]), "bon:4"], "none", "best-of-N ranks by the reward model"),
        (["bon:4"], str(setup["rm"]), "name one with --ref"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            compare.main(
                [
                    "--runs",
                    *runs,
                    "--prompts",
                    str(setup["prompts"]),
                    "--output_dir",
                    str(tmp_path / "r"),
                    "--reward_model",
                    reward_model,
                    *SAMPLING,
                ]
            )
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_training_curves_share_an_axis_of_episodes(tmp_path):
    from rlhf_toy.evaluation.report import training_curves

    ppo = fake_ppo_run(tmp_path)  # steps 1-3 without `episode`: step x the config's batch_size
    (ppo / "config.yaml").write_text(yaml.safe_dump({"total_episodes": 96, "batch_size": 32}))
    dpo = tmp_path / "dpo"
    dpo.mkdir()
    (dpo / "config.yaml").write_text(
        yaml.safe_dump({"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2})
    )
    (dpo / "summary.json").write_text(json.dumps({"num_processes": 2}))
    runlog.append_jsonl(
        dpo / "metrics.jsonl", [{"step": s, "objective/kl": 0.1 * s, "score/gold": 0.5} for s in (0, 3)]
    )
    runlog.append_jsonl(ppo / "metrics.jsonl", [{"step": 4, "episode": 128, "objective/kl": 2.0}])
    curves = training_curves({"ppo": ppo, "dpo": dpo})
    assert [x for x, _ in curves["ppo"]["KL to reference"]] == [
        32,
        64,
        96,
        128,
    ]  # step x batch_size, or `episode`
    assert [x for x, _ in curves["dpo"]["KL to reference"]] == [0, 48]  # 3 steps x 4 x 2 x 2 processes


def test_training_curves_on_wall_clock_go_on_across_a_resumed_session(tmp_path):
    from rlhf_toy.evaluation.report import plot_training_curves, training_curves

    run = tmp_path / "ppo"
    logger = runlog.MetricsLogger(run, tensorboard=False)
    for step in (1, 2):
        logger.log(step, {"episode": 8 * step, "objective/kl": 0.1 * step})
    first = runlog.read_jsonl(run / "metrics.jsonl")
    assert 0 <= first[0]["time/wall_s"] <= first[1]["time/wall_s"]
    # resumed from step 1: step 2 is redone, its time counted on from step 1's, not from zero
    resumed = runlog.MetricsLogger(run, tensorboard=False, resume_step=1)
    resumed.log(2, {"episode": 16, "objective/kl": 0.25})
    records = runlog.read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and records[1]["time/wall_s"] >= first[0]["time/wall_s"]
    runlog.append_jsonl(
        run / "metrics.jsonl", [{"step": 3, "episode": 24, "objective/kl": 0.3}]
    )  # an old record
    wall = training_curves({"ppo": run}, axis="wall")
    assert [x for x, _ in wall["ppo"]["KL to reference"]] == [r["time/wall_s"] for r in records]
    assert [v for _, v in wall["ppo"]["KL to reference"]] == [0.1, 0.25]
    plot_training_curves({"ppo": run}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
