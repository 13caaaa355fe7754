"""Report writers for compare: compare.md's table and notes, the gold-vs-KL frontier and training-curve
plots, and report.html with samples side by side."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from rlhf_toy import runlog

# Training-curve metrics overlaid across runs: (panel title, keys tried in order).
CURVES = [
    ("reward (RM score)", ("objective/scores", "score/rm")),
    ("KL to reference", ("objective/kl",)),
    ("gold (simulated human)", ("score/gold",)),
]


def fmt(value, digits=3) -> str:
    """A report cell: a float to `digits` places, "—" for a missing or non-finite value, anything else as str."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


TABLE_COLUMNS = [
    ("gold_mean", "gold"),
    ("rm_mean", "RM"),
    ("score_mean", "RM − penalties"),
    ("kl_to_ref", "KL to ref"),
    ("win_rate_vs_ref", "win rate vs ref (95% CI)"),
    ("length_mean", "length (tokens)"),
    ("eos_rate", "EOS rate"),
    ("on_topic_rate", "on-topic"),
    ("flattery_rate", "flattery"),
    ("junk_rate", "junk"),
    ("distinct_2", "distinct-2"),
    ("corpus_distinct_2", "pooled distinct-2"),
]


def _cell(metrics: dict, key: str) -> str:
    if key == "win_rate_vs_ref":
        lo, hi = metrics.get("win_rate_vs_ref_ci95") or [None, None]
        return f"{fmt(metrics.get(key))} [{fmt(lo, 2)}, {fmt(hi, 2)}]"
    if key == "kl_to_ref" and metrics.get("kl_to_ref_se") is not None:
        return f"{fmt(metrics[key])} ± {fmt(metrics['kl_to_ref_se'], 2)}"
    return fmt(metrics.get(key))


def _reward_names(items) -> list[str]:
    """The reward functions' names (compare's --rewards) in runs' metrics or pairs."""
    return sorted(
        {key.split("/")[1] for item in items for key in item if key.startswith("rewards/")}
        | {name for item in items for name in item.get("rewards") or {}}
    )


def markdown_table(report: dict) -> str:
    columns = TABLE_COLUMNS + [
        (f"rewards/{name}/mean", name) for name in _reward_names(report["runs"].values())
    ]
    head = "| run | " + " | ".join(title for _, title in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for label, metrics in report["runs"].items():
        lines.append(f"| {label} | " + " | ".join(_cell(metrics, k) for k, _ in columns) + " |")
    ckpt_lines = []
    for metrics in report["runs"].values():
        for ckpt in metrics.get("checkpoints", []):
            ckpt_lines.append(f"| {ckpt['label']} | " + " | ".join(_cell(ckpt, k) for k, _ in columns) + " |")
    if ckpt_lines:
        lines += [
            "",
            "Kept checkpoints:",
            "",
            head.replace("| run |", "| checkpoint |"),
            "|" + "---|" * (len(columns) + 1),
            *ckpt_lines,
        ]
    return "\n".join(lines)


def flags_table(report: dict) -> str:
    """Per run, the share of its answers gold flags with each kind of junk (`task.PENALTIES`' names)."""
    runs = {
        label: {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("junk/")}
        for label, m in report["runs"].items()
    }
    flags = sorted({flag for shares in runs.values() for flag in shares})
    if not flags:
        return ""
    lines = ["| run | " + " | ".join(flags) + " |", "|" + "---|" * (len(flags) + 1)]
    lines += [
        f"| {label} | " + " | ".join(fmt(shares.get(flag, 0.0)) for flag in flags) + " |"
        for label, shares in runs.items()
    ]
    return "\n".join(lines)


def _difference(diff: float, interval: list, significant: bool) -> str:
    return f"{diff:+.3f} [{interval[0]:+.3f}, {interval[1]:+.3f}]{' *' if significant else ''}"


def pairs_table(pairs: list[dict]) -> str:
    names = _reward_names(pairs)
    lines = [
        "| a − b | gold difference (95% CI) | win rate of a (95% CI) | "
        + "".join(f"{name} difference (95% CI) | " for name in names)
        + "prompts |",
        "|---|---|---|" + "---|" * len(names) + "---|",
    ]
    for p in pairs:
        if not p.get("n_prompts"):
            continue
        wlo, whi = p["win_rate_ci95"]
        rewards = [(p.get("rewards") or {}).get(name) or {} for name in names]
        lines.append(
            f"| {p['a']} − {p['b']} | {_difference(p['gold_diff'], p['gold_diff_ci95'], p['significant'])} | "
            f"{p['win_rate']:.3f} [{wlo:.2f}, {whi:.2f}] | "
            + "".join(
                (_difference(r["diff"], r["diff_ci95"], r["significant"]) if r.get("n_prompts") else "—")
                + " | "
                for r in rewards
            )
            + f"{p['n_prompts']} |"
        )
    return "\n".join(lines)


def pairs_in_words(pairs: list[dict]) -> str:
    """Which differences in gold have a 95% interval that excludes zero, said plainly."""
    pairs = [p for p in pairs if p.get("n_prompts")]
    if not pairs:
        return ""
    said = lambda p: (
        f"{p['a']} − {p['b']} ({p['gold_diff']:+.3f} [{p['gold_diff_ci95'][0]:+.3f}, {p['gold_diff_ci95'][1]:+.3f}])"
    )
    clear = [said(p) for p in pairs if p["significant"]]
    unclear = [f"{p['a']} − {p['b']}" for p in pairs if not p["significant"]]
    return (
        "Differences in gold whose 95% interval excludes zero (* above): "
        + ("; ".join(clear) or "none")
        + ". "
        + ("Not separable from zero on these prompts: " + ", ".join(unclear) + ". " if unclear else "")
        + f"Each interval is a paired bootstrap over prompts; there is no correction for the {len(pairs)} comparisons "
        "made, so about one in twenty intervals of pairs that truly do not differ would exclude zero by chance."
    )


def compare_markdown(report: dict) -> str:
    """compare.md: the headline split's tables (the last --prompts file), then every split's, then notes."""
    s = report["settings"]
    headline = s.get("headline_split")
    out = ["# Comparison", ""]
    if report.get("splits"):
        out += [
            f"## {headline} prompts ({report['splits'][headline]['n_prompts']}): the headline numbers",
            "",
        ]
    out += [
        markdown_table(report),
        "",
        "Every run against every other, same prompts and seeds (a − b):",
        "",
        pairs_table(report.get("pairs", [])),
        "",
        pairs_in_words(report.get("pairs", [])),
        "",
    ]
    if flags_table(report):
        out += [
            "What gold flags, per kind of junk (share of each run's answers; an answer can have several):",
            "",
            flags_table(report),
            "",
        ]
    for name, table in (report.get("splits") or {}).items():
        if name == headline:
            continue
        sub = {**report, "runs": table["runs"]}
        out += [
            f"## {name} prompts ({table['n_prompts']})" + (": all files pooled" if name == "all" else ""),
            "",
            markdown_table(sub),
            "",
            pairs_table(table["pairs"]),
            "",
            pairs_in_words(table["pairs"]),
            "",
        ]
    out += ["## Method", ""] + [f"- {n}" for n in method_notes(report)]
    out += [
        "",
        "Plots: `frontier.png` (gold vs KL), `curves.png` (training curves); samples side by side in "
        "`report.html`; every scored sample in `samples/`.",
        "",
    ]
    return "\n".join(out)


def method_notes(report: dict) -> list[str]:
    s = report["settings"]
    files = s["prompts"] if isinstance(s["prompts"], str) else ", ".join(s["prompts"])
    return (
        [
            f"Prompts: {files} ({s['n_prompts']} prompts × {s['samples_per_prompt']} sample(s) each"
            + (f"; the tables up front are the {s['headline_split']} split's" if report.get("splits") else "")
            + "). Every model "
            f"samples with temperature {s['temperature']}, at most {s['max_new_tokens']} new tokens, no "
            "top-k/top-p, and the "
            "same per-batch seeds (common random numbers).",
            f"Reference: {report['ref']} ({report['ref_model']}).",
            "KL to ref: sequence KL(π‖π_ref) estimated on π's own samples as the mean over samples of "
            "Σ_t [log π(y_t|x,y<t) − log π_ref(y_t|x,y<t)] over the response tokens (EOS included), both log-probs "
            "taken at the sampling temperature (logits / T), so it is the KL between the distributions the "
            "samples come from: log π from the logits the sampler drew each token from, log π_ref from a forward "
            "pass (under bf16 the sampler's differ from a forward pass's by its rounding: on the demo's PPO and "
            "DPO models, by 0.24 nats an answer (sd), 0.02 or less on average); ± is one standard error.",
            "Win rate vs ref: by gold, against the reference's answer to the same prompt with the same "
            "seed; ties count "
            f"half; 95% percentile bootstrap over prompts ({s['n_bootstrap']} resamples).",
            "distinct-2: distinct word bigrams / all word bigrams of each answer, averaged; pooled "
            "distinct-2: the same "
            "over all the run's answers together, so a run that tells every prompt the same thing scores low. length: "
            "response tokens (EOS included). EOS rate: share of responses that ended with EOS within the token limit.",
            "on-topic: share of answers that name the film asked about (the exact title, whole words, any "
            "case; — where "
            "the prompts carry no title); flattery: share of answers that talk to or about the user or "
            "themselves instead "
            "of the film (flattery, assistant-speak, not having seen it, talk about the answer); junk: "
            "share of answers "
            "gold flags with any kind of junk (docs/gold_judge.md): the gold judge's terms (`rlhf_toy/task.py`).",
            "a − b: the mean over prompts of the gold difference between a's and b's answers to the same prompt and "
            "seed, and how often a's answer has the higher gold (ties half), each with a 95% paired percentile "
            f"bootstrap interval over prompts ({s['n_bootstrap']} resamples).",
            *(
                [
                    f"Reward functions ({', '.join(s['rewards'])}): every answer scored as PPO's training "
                    "scores it, from its "
                    "prompt record's columns; the column is their mean over answers, a − b its paired "
                    "difference (bootstrap "
                    "as for gold)."
                ]
                if s.get("rewards")
                else []
            ),
            "RM: "
            + (
                f"{report['reward_model']} (normalised: mean 0, std 1 on SFT samples); RM − penalties subtracts "
                f"{report['penalties']['length_coef']}·max(0, tokens − {report['penalties']['length_target']}) and "
                f"{report['penalties']['missing_eos_penalty']} for a missing EOS (PPO's training score)."
                if report.get("reward_model")
                else "none."
            ),
        ]
        + report.get("notes", [])
        + ([runlog.environment_line(report["environment"])] if "environment" in report else [])
    )


def plot_frontier(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (label, m) in enumerate(report["runs"].items()):
        color = f"C{i % 10}"
        points = [
            (c["step"], c["kl_to_ref"], c["gold_mean"])
            for c in m.get("checkpoints", [])
            if c["kl_to_ref"] is not None
        ]
        if m["kl_to_ref"] is not None:
            points.append((math.inf, m["kl_to_ref"], m["gold_mean"]))
        if not points:
            continue
        points.sort()
        ax.plot([p[1] for p in points], [p[2] for p in points], "-", color=color, alpha=0.4)
        ax.plot([p[1] for p in points[:-1]], [p[2] for p in points[:-1]], "o", color=color, ms=4, alpha=0.6)
        ax.plot([points[-1][1]], [points[-1][2]], "o", color=color, ms=9, label=label)
        ax.annotate(
            label, (points[-1][1], points[-1][2]), textcoords="offset points", xytext=(6, 4), fontsize=8
        )
    ax.set_xlabel("KL to reference (nats per sequence)")
    ax.set_ylabel("gold mean")
    ax.set_title("gold vs KL (small dots: kept checkpoints)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_panels(rows: list, path: Path, *, title: str | None = None, styles: dict | None = None) -> None:
    """Curves of several runs overlaid, one grid row per entry of `rows`: (curves, x label, panel titles) with
    curves {run: {panel title: [(x, value)]}}. One colour per run across the grid; `styles` {run: matplotlib
    format} tells apart runs whose curves should coincide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(run for curves, _, _ in rows for run in curves))
    ncols = max(len(panels) for _, _, panels in rows)
    fig, grid = plt.subplots(len(rows), ncols, figsize=(4.2 * ncols, 3.6 * len(rows)), squeeze=False)
    for axes, (curves, xlabel, panels) in zip(grid, rows):
        for ax in axes[len(panels) :]:
            ax.set_visible(False)
        for ax, panel in zip(axes, panels):
            for i, run in enumerate(runs):
                points = curves.get(run, {}).get(panel)
                if points:
                    ax.plot(
                        [p[0] for p in points],
                        [p[1] for p in points],
                        (styles or {}).get(run, "-o" if len(points) < 12 else "-"),
                        ms=3,
                        color=f"C{i % 10}",
                        label=run,
                    )
            ax.set_title(panel, fontsize=10)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
            else:
                ax.text(
                    0.5,
                    0.5,
                    "no run logged this",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                    color="gray",
                )
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training_curves(run_dirs: dict, path: Path) -> None:
    """compare's curves.png: the runs' CURVES on episodes and, below, on wall-clock seconds."""
    panels = [title for title, _ in CURVES]
    rows = [(training_curves(run_dirs), "episodes (answers scored; DPO: pairs seen)", panels)]
    wall = training_curves(run_dirs, axis="wall")
    if wall:  # runs trained before metrics carried time/wall_s have none
        rows.append((wall, "wall-clock seconds of training (evaluations included)", panels))
    plot_panels(rows, path)


def training_curves(run_dirs: dict, axis: str = "episodes") -> dict:
    """{run: {panel: [(x, value)]}} from each run's metrics.jsonl. With axis="episodes" x is what the steps
    consumed, so runs of different batch sizes and kinds overlay: PPO's `episode` (answers sampled and scored),
    an HF/TRL stage's step times its batch (pairs for DPO); a run whose batch is unknown keeps its steps. With
    axis="wall", x is the record's `time/wall_s` (runlog.MetricsLogger's; records without it are left out)."""
    curves = {}
    for run, run_dir in run_dirs.items():
        records = runlog.read_jsonl(run_dir / "metrics.jsonl")
        per_step = examples_per_step(run_dir)
        x_of = (
            (lambda r: r.get(runlog.WALL_KEY))
            if axis == "wall"
            else (lambda r: r.get("episode", r["step"] * per_step))  # noqa: B023 (used in this iteration)
        )
        panels = {}
        for title, keys in CURVES:
            for key in keys:
                points = [
                    (x_of(r), r[key])
                    for r in records
                    if isinstance(r.get(key), (int, float)) and "step" in r and x_of(r) is not None
                ]
                if points:
                    panels[title] = points
                    break
        if panels:
            curves[run] = panels
    return curves


def examples_per_step(run_dir: Path) -> int:
    """Examples one optimizer step of a run consumed, from its config.yaml (and summary.json's process count):
    PPO's batch_size, an HF/TRL stage's per_device_train_batch_size x gradient_accumulation_steps x processes;
    1 where the config says neither."""
    import yaml

    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return 1
    if "total_episodes" in config:
        return int(config.get("batch_size", 1))
    if "per_device_train_batch_size" not in config:
        return 1
    try:
        processes = int(json.loads((run_dir / "summary.json").read_text()).get("num_processes") or 1)
    except (OSError, ValueError):
        processes = 1
    return (
        int(config["per_device_train_batch_size"])
        * int(config.get("gradient_accumulation_steps", 1))
        * processes
    )


# The per-token view: each answer token is a span holding its view's columns (k1 = log π − log π_ref, the KL
# penalty PPO's reward pays there; PPO's training samples also the advantage, value, ratio and reward); the
# page's script colours every token by the chosen column (k1: red where the policy made the token likelier
# than the reference, blue less likely, full colour at 2 nats; the others by their distance from 0, or 1 for
# the ratio, scaled to the page's largest) and the menu switches the column or the colours off.
TOKEN_SCRIPT = """
const CENTRE = {ratio: 1};
function colourTokens() {
  const column = document.getElementById('column').value;
  const spans = [...document.querySelectorAll('.tok')];
  const centre = CENTRE[column] || 0;
  const values = spans.map(el => parseFloat(el.dataset[column]) - centre);
  const scale = column === 'k1' ? 2 : Math.max(1e-9, ...values.filter(v => !isNaN(v)).map(Math.abs));
  spans.forEach((el, i) => {
    const v = values[i];
    if (column === 'none' || isNaN(v)) { el.style.backgroundColor = ''; return; }
    const a = Math.min(1, Math.abs(v) / scale) * 0.75;
    el.style.backgroundColor = v >= 0 ? `rgba(220, 50, 47, ${a.toFixed(3)})` : `rgba(38, 139, 210, ${a.toFixed(3)})`;
  });
  document.getElementById('legend').dataset.tokens = spans.filter(el => el.style.backgroundColor).length;
}
document.addEventListener('DOMContentLoaded', () => {   // report.html#column=advantage opens on that column
  const chosen = location.hash.match(/column=(\\w+)/);
  if (chosen) document.getElementById('column').value = chosen[1];
  colourTokens();
});
"""
TOKEN_LEGEND = (
    "colour each token by <select id='column' onchange='colourTokens()'><option value='k1' selected>"
    "log π − log π_ref (the KL penalty it pays)</option><option value='advantage'>the advantage (PPO's "
    "training samples)</option><option value='value'>the value V(s_t)</option><option value='ratio'>the "
    "ratio π/π_old at the update</option><option value='reward'>the per-token reward</option>"
    "<option value='none'>nothing</option></select> (hover a token for its numbers) <span id='legend'>"
    "<span style='background:rgba(220,50,47,.75)'>above</span>"
    "<span style='background:rgba(38,139,210,.75)'>below</span></span>"
)
# What each column of a per-token view is (samples' `token_view`: compare's k1; PPO's training samples add the rest).
TOKEN_COLUMNS = {
    "k1": "log π − log π_ref",
    "advantage": "advantage",
    "value": "value V(s_t)",
    "ratio": "ratio π/π_old at the update",
    "reward": "reward (−β·k1, + the score on the last token)",
}


def token_spans(row: dict) -> str:
    """A sample's answer as one span per token carrying every column of its view (as data attributes, and in the
    hover text); empty when the row has no per-token view."""
    view = row.get("token_view") or {}
    if not view.get("token") or not view.get("k1"):
        return ""
    columns = [name for name in TOKEN_COLUMNS if name in view]
    spans = []
    for t, token in enumerate(view["token"]):
        data = " ".join(f"data-{name}='{view[name][t]:.4f}'" for name in columns)
        hover = " · ".join(f"{TOKEN_COLUMNS[name]} {view[name][t]:+.3f}" for name in columns)
        spans.append(f"<span class='tok' {data} title='{html.escape(hover)}'>{html.escape(token)}</span>")
    return "".join(spans)


def last_training_samples(run_dirs: dict, per_run: int) -> dict:
    """{run: the first `per_run` samples of its last sampled step that have a per-token view} (PPO's samples.jsonl)."""
    found = {}
    for run, run_dir in run_dirs.items():
        rows = [
            r for r in runlog.read_jsonl(run_dir / "samples.jsonl") if isinstance(r.get("token_view"), dict)
        ]
        if rows:
            last = max(r.get("step", 0) for r in rows)
            found[run] = [r for r in rows if r.get("step", 0) == last][:per_run]
    return found


def write_html(
    report: dict, rows_by_label: dict, out_dir: Path, *, max_prompts: int, training: dict | None = None
) -> Path:
    """report.html: the tables, the plots, the samples (each answer's tokens coloured, `token_spans`) and, from
    `training` ({run: rows}, `last_training_samples`), PPO's last training samples with their per-token view."""

    def img(name):
        encoded = base64.b64encode((out_dir / name).read_bytes()).decode()
        return f'<img src="data:image/png;base64,{encoded}" alt="{name}">'

    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>rlhf_toy compare</title><style>",
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}th{background:#f3f3f3}"
        ".resp{white-space:pre-wrap;max-width:360px}.s{color:#555;font-size:85%}img{max-width:100%}"
        ".good{background:#eaf7ea}.bad{background:#fbeaea}.tok{border-radius:2px}"
        "#legend span{padding:0 4px}",
        f"</style><script>{TOKEN_SCRIPT}</script></head><body><h1>Comparison</h1>",
        "<table><tr><th>run</th>" + "".join(f"<th>{e(t)}</th>" for _, t in TABLE_COLUMNS) + "</tr>",
    ]
    for label, m in report["runs"].items():
        parts.append(
            f"<tr><td>{e(label)}</td>"
            + "".join(f"<td>{e(_cell(m, k))}</td>" for k, _ in TABLE_COLUMNS)
            + "</tr>"
        )
    parts.append("</table><ul>" + "".join(f"<li>{e(n)}</li>" for n in method_notes(report)) + "</ul>")
    parts.append(f"<h2>Gold vs KL</h2>{img('frontier.png')}<h2>Training curves</h2>{img('curves.png')}")
    labels = list(report["runs"])
    by_prompt = {label: {(r["prompt_id"], r["sample"]): r for r in rows_by_label[label]} for label in labels}
    keys = sorted(by_prompt[labels[0]])[:max_prompts]
    parts.append(
        f"<h2>Samples ({len(keys)} shown)</h2><p>{TOKEN_LEGEND}</p><table><tr><th>prompt</th>"
        + "".join(f"<th>{e(label)}</th>" for label in labels)
        + "</tr>"
    )
    for key in keys:
        prompt = by_prompt[labels[0]][key]["prompt"]
        text = prompt[-1]["content"] if isinstance(prompt, list) else str(prompt)
        parts.append(
            f"<tr><td class='resp'>#{key[0]}"
            + (f" (sample {key[1]})" if key[1] else "")
            + f"<br>{e(text)}</td>"
        )
        for label in labels:
            r = by_prompt[label].get(key)
            if r is None:
                parts.append("<td></td>")
                continue
            cls = "good" if r["gold"] > 0.3 else "bad" if r["gold"] < -0.3 else ""
            scores = f"gold {fmt(r['gold'], 2)} · RM {fmt(r.get('rm'), 2)} · {r['n_tokens']} tok" + (
                "" if r["has_eos"] else " · no EOS"
            )
            parts.append(
                f"<td class='resp {cls}'>{token_spans(r) or e(r['response'])}<div class='s'>{e(scores)}</div></td>"
            )
        parts.append("</tr>")
    parts.append("</table>")
    for run, rows in (training or {}).items():
        parts.append(
            f"<h2>{e(run)}: training samples of step {rows[0].get('step')} (what the update saw)</h2>"
            "<table><tr><th>prompt</th><th>answer</th></tr>"
        )
        for r in rows:
            prompt = r["prompt"][-1]["content"] if isinstance(r["prompt"], list) else str(r["prompt"])
            scores = (
                f"score {fmt(r.get('score'), 2)} · gold {fmt(r.get('gold'), 2)} · KL {fmt(r.get('kl'), 2)}"
            )
            parts.append(
                f"<tr><td class='resp'>{e(prompt)}</td><td class='resp'>{token_spans(r) or e(r['response'])}"
                f"<div class='s'>{e(scores)}</div></td></tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    path = out_dir / "report.html"
    path.write_text("".join(parts), encoding="utf-8")
    return path
