"""report.html's per-token view, rendered by a real headless browser: the page's script must run and colour
every token by its log π − log π_ref."""

import json
import os
import re
import shutil
import subprocess

import pytest
from test_compare import fake_ppo_run, setup  # noqa: F401  (setup: the fixture)

from rlhf_toy import runlog
from rlhf_toy.evaluation import compare

BROWSER = next(
    (shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)),
    None,
)


TRAINING_VIEW = {
    "token": ["Great", " film", "<eos>"],
    "k1": [0.5, -0.25, 0.0],
    "advantage": [1.0, -2.0, 0.5],
    "value": [0.1, 0.2, 0.3],
    "ratio": [1.0, 1.1, 0.8],
    "reward": [-0.025, 0.0125, 0.9],
}


def compare_with_token_views(tmp_path, setup):  # noqa: F811
    """A small compare of the tiny reference and a perturbed copy whose run directory has a PPO training sample;
    returns the report's directory and the copy's rows."""
    ppo, out = fake_ppo_run(tmp_path), tmp_path / "report"
    runlog.append_jsonl(
        ppo / "samples.jsonl",
        [
            {
                "step": 3,
                "prompt": [{"role": "user", "content": "Review X."}],
                "response": "Great film",
                "score": 0.9,
                "gold": 0.5,
                "kl": 0.25,
                "token_view": TRAINING_VIEW,
            }
        ],
    )
    compare.main(
        [
            "--runs",
            str(setup["ref"]),
            str(ppo),
            "--prompts",
            str(setup["prompts"]),
            "--output_dir",
            str(out),
            "--reward_model",
            str(setup["rm"]),
            "--checkpoints",
            "0",
            "--limit",
            "4",
            "--max_new_tokens",
            "10",
            "--batch_size",
            "4",
            "--n_bootstrap",
            "200",
        ]
    )
    return out, runlog.read_jsonl(out / "samples/ppo.jsonl")


def test_compare_rows_carry_each_tokens_k1_summing_to_the_answers_kl(tmp_path, setup):  # noqa: F811
    from rlhf_toy import models

    _, rows = compare_with_token_views(tmp_path, setup)
    specials = set(models.load_tokenizer(str(setup["ref"])).all_special_tokens)
    for row in rows:
        view = row["token_view"]
        assert len(view["token"]) == len(view["k1"]) == row["n_tokens"]
        squeeze = lambda text: re.sub(r"\s+", "", text)
        # every token of the answer, special ones (EOS, a sampled <unk>) shown, which the answer's text leaves out
        shown = [token for token in view["token"] if token not in specials]
        assert squeeze("".join(shown)) == squeeze(row["response"])
        assert sum(view["k1"]) == pytest.approx(row["kl"], abs=1e-3)  # rounded to 4 digits a token


@pytest.mark.skipif(
    BROWSER is None and not os.environ.get("CI"),
    reason="no chromium here (.ci/run installs Debian's chromium, so CI runs this test)",
)
def test_report_html_colours_every_token_in_a_headless_browser(tmp_path, setup):  # noqa: F811
    assert BROWSER is not None, "CI must have chromium: .ci/run installs it (apt-get install chromium)"
    out, rows = compare_with_token_views(tmp_path, setup)
    source = (out / "report.html").read_text()
    assert "background-color" not in re.sub(
        r"<script>.*?</script>", "", source, flags=re.S
    )  # only the script colours

    def rendered(fragment=""):
        return subprocess.run(
            [
                BROWSER,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--virtual-time-budget=5000",
                "--dump-dom",
                (out / "report.html").as_uri() + fragment,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout

    def colours(dom, column):
        found = re.findall(
            rf'<span class="tok"[^>]*data-{column}="([-0-9.]+)"[^>]*style="background-color: rgba?\(([^)]*)\)',
            dom,
        )
        return [(float(v), [float(c) for c in colour.split(",")]) for v, colour in found]

    dom = rendered()
    spans = colours(dom, "k1")
    report = json.loads((out / "compare.json").read_text())
    shown = sum(len(r["token_view"]["token"]) for r in rows) + len(
        TRAINING_VIEW["token"]
    )  # the reference: none (k1 = 0)
    assert len(spans) == shown and report["runs"]["ppo"]["n_samples"] == len(rows)
    for k1, (
        red,
        green,
        blue,
        *alpha,
    ) in spans:  # red where the policy made the token likelier, blue less; ∝ |k1|
        assert (red, green, blue) == ((220, 50, 47) if k1 >= 0 else (38, 139, 210))
        assert (alpha[0] if alpha else 1.0) == pytest.approx(
            min(1, abs(k1) / 2) * 0.75, abs=6e-3
        )  # 8-bit alpha
    assert f'data-tokens="{shown}"' in dom  # the script counted what it coloured
    assert "training samples of step 3" in dom and "advantage +1.000" in dom  # the training sample, its hover
    # the menu's other columns: only the training sample has advantages; scaled to the largest, 2.0
    advantage = colours(rendered("#column=advantage"), "advantage")
    assert [(v, c[:3]) for v, c in advantage] == [
        (1.0, [220, 50, 47]),
        (-2.0, [38, 139, 210]),
        (0.5, [220, 50, 47]),
    ]
    assert [c[3] if len(c) > 3 else 1.0 for _, c in advantage] == pytest.approx(
        [0.375, 0.75, 0.1875], abs=6e-3
    )
