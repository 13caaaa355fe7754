import io
import json

import pytest

from rlhf_toy.evaluation import inspect_samples

PROMPTS = [
    'Write a short review of "The Iron Meadow".',
    'Briefly, how was the film "The Glass Island"?',
    'Offer a short opinion on the movie "The Wild Summer".',
]
# (gold, rm) per prompt for runs a and b; b's answer to prompt 1 is a reward hack: RM high, gold low.
SCORES = {"a": [(0.8, 0.5), (0.2, 0.1), (0.5, 0.3)], "b": [(0.7, 0.4), (-0.8, 2.5), (0.6, 0.2)]}
HACK = "great great great great great great great great " * 6


def write_report(root):
    """A compare report as compare.py leaves it: compare.json and samples/LABEL.jsonl + .meta.json."""
    (root / "samples").mkdir(parents=True)
    (root / "compare.json").write_text(json.dumps({"runs": {"a": {}, "b": {}}}))
    for label, scores in SCORES.items():
        rows = [
            {
                "prompt_id": i,
                "sample": 0,
                "label": label,
                "prompt": [{"role": "user", "content": p}],
                "response": HACK if (label, i) == ("b", 1) else f"a fine film, says {label}.",
                "gold": g,
                "rm": rm,
                "score": rm - 0.1,
                "length_penalty": 0.1,
                "n_tokens": 12,
                "has_eos": True,
                "kl": 1.0,
            }
            for i, (p, (g, rm)) in enumerate(zip(PROMPTS, scores))
        ]
        (root / "samples" / f"{label}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / "samples" / f"{label}.meta.json").write_text(json.dumps({"label": label}))
    return root


def show(*sources, stream=None, **options):
    args = inspect_samples.build_parser().parse_args([str(s) for s in sources] + ["--width", "80"])
    args.__dict__.update(options)
    return inspect_samples.run_inspect(args, stream=stream or io.StringIO())


def test_sort_by_disagreement_puts_the_reward_hack_first(tmp_path):
    text = show(write_report(tmp_path / "report"), sort="disagreement")
    first_prompt = text.splitlines()[1]
    assert "#1" in first_prompt and "Glass Island" in first_prompt and "disagreement +" in first_prompt
    assert text.index("Glass Island") < text.index("Iron Meadow") and "RM ≫ gold" in text
    assert "len-pen 0.10" in text and "gold -0.80" in text and "RM +2.50" in text
    assert "\033[" not in text  # not a TTY: no colour
    assert all(len(line) <= 80 for line in text.splitlines())  # wrapped to the width


def test_filters_by_prompt_text_id_and_run(tmp_path):
    report = write_report(tmp_path / "report")
    text = show(report, grep="wild summer")
    assert "Wild Summer" in text and "Iron Meadow" not in text and "Glass Island" not in text
    text = show(report, id=[0, 2])
    assert "#0" in text and "#2" in text and "#1 " not in text
    text = show(report, runs=["a"])
    assert "says a" in text and "says b" not in text
    with pytest.raises(inspect_samples.InspectError, match="no prompt matches"):
        show(report, grep="no such film")


def test_colour_on_request_and_run_directories_show_their_latest_samples(tmp_path):
    assert "\033[" in show(write_report(tmp_path / "report"), color="always")
    run = tmp_path / "runs/sft"
    run.mkdir(parents=True)
    rows = [
        {
            "stage": stage,
            "prompt": [{"role": "user", "content": PROMPTS[0]}],
            "response": f"{stage} answer",
            "gold": 0.1,
            "n_tokens": 3,
            "has_eos": stage == "after",
        }
        for stage in ("before", "after")
    ]
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = show(run)
    assert "after answer" in text and "before answer" not in text and "RM —" in text
    with pytest.raises(inspect_samples.InspectError, match="no RM scores"):
        show(run, sort="disagreement")


def test_cli_reports_bad_input_in_one_line(tmp_path, run_script):
    result = run_script("inspect_samples", tmp_path / "nothing_here", check=False)
    assert (
        result.returncode == 2
        and result.stderr.strip().startswith("error:")
        and "no samples here" in result.stderr
    )
    result = run_script(
        "inspect_samples", write_report(tmp_path / "report"), "--sort", "disagreement", "--limit", "1"
    )
    assert "Glass Island" in result.stdout and "Iron Meadow" not in result.stdout


def test_prompt_samples_each_run_on_a_typed_prompt(tmp_path, capsys):
    from test_compare import tiny_copy
    from test_dpo import make_tiny_reward_model

    from rlhf_toy import models, task

    run = tiny_copy(tmp_path / "ppo" / "final", noise=0.05)
    rm = make_tiny_reward_model(tmp_path / "rm")
    prompt = 'Review the film "The Iron Meadow" in one line.'
    text = show(
        "base",
        str(run),
        prompt=prompt,
        max_new_tokens=10,
        reward_model=str(rm),
        base=models.TINY_MODEL,
        dtype="float32",
        width=100,
    )
    assert text.count(prompt) == 1  # one prompt, every run's answers under it
    lines = [line for line in text.splitlines() if line.strip().startswith(("base", "ppo"))]
    assert len(lines) == 4 and all("gold " in line and "RM " in line for line in lines)  # 2 runs x 2 samples
    assert sum(line.strip().startswith("ppo#1") for line in lines) == 1
    # the title comes from the prompt's quotes: gold is the judge's, on-topic term included
    assert inspect_samples.quoted_title(prompt) == "The Iron Meadow"
    assert task.gold_parts("x", "The Iron Meadow")["off_topic"] == task.PENALTIES["off_topic"]
    with pytest.raises(SystemExit) as exit_info:
        inspect_samples.main(["--prompt", prompt, str(tmp_path / "no_such_run"), "--reward_model", "none"])
    assert exit_info.value.code == 2 and "no_such_run" in capsys.readouterr().err
    with pytest.raises(
        SystemExit
    ) as exit_info:  # a temperature of 0 or less is refused before any model loads
        inspect_samples.main(["--prompt", prompt, str(tmp_path / "no_such_run"), "--temperature", "-1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "argument --temperature: must be a finite number > 0, got -1" in err


def test_reward_function_verdicts_are_shown_beside_gold(tmp_path):
    """A verifiable task's compare (--rewards) or PPO's samples: each function's value on the answer's line."""
    report = write_report(tmp_path / "report")
    path = report / "samples" / "a.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text(
        "".join(
            json.dumps({**r, "rewards": {"rm": 0.5, "correct_sum": 1.0, "number_only": 0.0}}) + "\n"
            for r in rows
        )
    )
    lines = show(report).splitlines()
    a_lines = [line for line in lines if line.startswith("  a  gold")]
    assert len(a_lines) == 3 and all(line.endswith("correct_sum 1  number_only 0") for line in a_lines)
    assert not any("correct_sum" in line for line in lines if line.startswith("  b  gold"))


def test_tokens_show_each_tokens_kl_and_add_up_to_the_answers(tmp_path, capsys):
    from test_compare import tiny_copy

    ref = tiny_copy(tmp_path / "sft" / "final")
    run = tiny_copy(tmp_path / "ppo" / "final", noise=0.3, seed=3)
    prompt = 'Review the film "The Iron Meadow" in one line.'
    args = inspect_samples.build_parser().parse_args(
        [
            "--prompt",
            prompt,
            str(run),
            str(ref),
            "--tokens",
            "--ref",
            str(ref),
            "--reward_model",
            "none",
            "--max_new_tokens",
            "8",
            "--dtype",
            "float32",
            "--samples",
            "2",
        ]
    )
    rows = inspect_samples.sample_prompt(args)
    for row in rows:
        tokens = row["tokens"]
        assert len(tokens) == row["n_tokens"] and all(t["exact_kl"] >= -1e-6 for t in tokens)
        # the per-token differences add up to the answer's sequence KL, computed apart by sample_and_score
        assert sum(t["k1"] for t in tokens) == pytest.approx(row["kl"], abs=1e-4)
        if row["label"] == "sft":  # the reference against itself: nothing moved
            assert all(abs(t["k1"]) < 1e-6 and abs(t["exact_kl"]) < 1e-6 for t in tokens)
    assert any(abs(t["k1"]) > 1e-3 for row in rows if row["label"] == "ppo" for t in row["tokens"])
    text = inspect_samples.run_inspect(args)
    assert "log π_ref" in text and "exact KL" in text and text.count("sum ") == 4
    with pytest.raises(SystemExit) as exit_info:
        inspect_samples.main(["--prompt", prompt, str(run), "--tokens", "--reward_model", "none"])
    assert exit_info.value.code == 2 and "name it with --ref" in capsys.readouterr().err
