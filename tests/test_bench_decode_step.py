"""scripts/bench_decode_step.py: its hand-fused Llama step computes the model's own decode step (or the script
stops), so the speeds it prints compare like with like."""

import importlib.util
import json

import pytest
import torch
from conftest import ROOT, make_tiny_llama

from rlhf_toy import models


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A random Llama (`make_tiny_llama`) saved with the tiny model's tokenizer."""
    tokenizer = models.load_tokenizer(models.TINY_MODEL)
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_bench_runs_and_its_fused_step_gives_the_models_logits(tiny_llama_dir, tmp_path, run_script):
    output = tmp_path / "decode_step"
    run_script(
        "bench_decode_step",
        *("--model", tiny_llama_dir, "--batches", 2, 3, "--precisions", "float32", "--output", output),
    )
    rows = json.loads(output.with_suffix(".json").read_text())["rows"]
    assert [(r["precision"], r["batch"]) for r in rows] == [("float32", 2), ("float32", 3)]
    assert all(r["fused_max_logit_diff"] <= 1e-4 for r in rows)
    assert all(r[k] > 0 for r in rows for k in ("sampler_step_ms", "matmuls_ms", "fused_step_ms", "bound_ms"))
    assert "| float32 | 3 |" in output.with_suffix(".md").read_text()


def test_a_fused_step_that_computes_something_else_stops_the_bench(tiny_llama_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("bench_decode_step", ROOT / "scripts/bench_decode_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    tokenizer = models.load_tokenizer(str(tiny_llama_dir))
    model = models.load_causal_lm(str(tiny_llama_dir), tokenizer, device="cpu").eval()
    precision = models.resolve_precision("float32", torch.device("cpu"))
    prompts = [[{"role": "user", "content": "Review the film " + "again " * i}] for i in range(3)]
    args = type("Args", (), {"max_prompt_length": 64, "compile": False})
    assert bench.measure(model, tokenizer, prompts, 3, precision, args)["fused_max_logit_diff"] <= 1e-4

    real_init = bench.FusedLlamaStep.__init__

    def off_by_five_percent(self, *a, **kw):  # the last block's second norm 5% off
        real_init(self, *a, **kw)
        norm1, qkv, o, norm2, gate_up, down = self.layers[-1]
        self.layers[-1] = (norm1, qkv, o, norm2 * 1.05, gate_up, down)

    monkeypatch.setattr(bench.FusedLlamaStep, "__init__", off_by_five_percent)
    with pytest.raises(SystemExit, match="does not compute the model's step"):
        bench.measure(model, tokenizer, prompts, 3, precision, args)
