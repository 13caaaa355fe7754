from pathlib import Path

import pytest
import torch

from rlhf_toy import models, sequences
from rlhf_toy.models import ModelNotFoundError


def test_tiny_model_builds_offline_with_distinct_pad():
    tokenizer = models.load_tokenizer(models.TINY_MODEL)
    model = models.load_causal_lm(models.TINY_MODEL, tokenizer, device="cpu")
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("Assistant: ")


def test_missing_path_and_run_dir_without_model(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        models.resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="holds no model: a model directory has a config.json"):
        models.resolve_model_path(str(tmp_path))
    # A run directory: the hint names its final/ only when there is one.
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(ModelNotFoundError, match="without a final/ model yet") as error:
        models.resolve_model_path(str(tmp_path))
    assert str(tmp_path / "final") not in str(error.value)
    (tmp_path / "final").mkdir()
    (tmp_path / "final/config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match=f"final/ subdirectory: {tmp_path / 'final'}"):
        models.resolve_model_path(str(tmp_path))


def test_offline_hub_id_names_the_embedded_default():
    with pytest.raises(ModelNotFoundError, match="embedded:smollm2-135m-instruct"):
        models.resolve_model_path("distilgpt2")


def test_unknown_embedded_model():
    with pytest.raises(ModelNotFoundError, match="unknown embedded model"):
        models.resolve_model_path("embedded:nothing")


def test_auto_precision_is_bf16_mixed_only_where_the_cpu_has_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)  # e.g. an AVX2-only laptop
    assert models.resolve_precision("auto", cpu) == models.Precision(
        "float32", torch.float32, torch.float32, "cpu"
    )
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)  # AVX512-BF16 or AMX
    mixed = models.resolve_precision("auto", cpu)
    assert (mixed.name, mixed.weights, mixed.compute, mixed.mixed) == (
        "bfloat16-mixed",
        torch.float32,
        torch.bfloat16,
        True,
    )
    with mixed.autocast():  # float32 weights, bf16 matmuls
        assert torch.nn.Linear(4, 4)(torch.ones(2, 4)).dtype == torch.bfloat16
    # named precisions are taken as given, whatever the hardware
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    assert models.resolve_precision("bfloat16-mixed", cpu).compute == torch.bfloat16
    pure = models.resolve_precision("bfloat16", cpu)
    assert (pure.weights, pure.compute, pure.mixed) == (torch.bfloat16, torch.bfloat16, False)
    assert models.resolve_precision("float16", cpu).weights == torch.float16
    with models.resolve_precision("float32", cpu).autocast():  # no autocast: float32 stays float32
        assert torch.nn.Linear(4, 4)(torch.ones(2, 4)).dtype == torch.float32
    with pytest.raises(
        ValueError, match="dtype must be one of auto, float32, bfloat16-mixed, bfloat16, float16"
    ):
        models.resolve_precision("float8", cpu)


def test_cpu_bf16_detection_reads_the_cpu_not_the_model(monkeypatch):
    """torch's cpuinfo probes decide; without them (an older torch) the kernel's CPU flags do."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert models.cpu_has_native_bf16()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not models.cpu_has_native_bf16()
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    assert models.cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & set(flags))


def test_truncate_at_eos_keeps_eos_and_pads_after():
    tokens = torch.tensor([[5, 6, 0, 7, 0], [5, 6, 7, 8, 9]])
    out, _ = sequences.truncate_at_eos(tokens, eos_token_id=0, pad_token_id=1)
    assert out.tolist() == [[5, 6, 0, 1, 1], [5, 6, 7, 8, 9]]


def test_long_prompt_is_truncated_from_the_left():
    tokenizer = models.load_tokenizer(models.TINY_MODEL)
    long_prompt = [{"role": "user", "content": " ".join(["film"] * 300)}]
    short_prompt = [{"role": "user", "content": "film"}]
    ids, mask, truncated = sequences.encode_prompts(
        tokenizer, [long_prompt, short_prompt], max_prompt_length=16
    )
    assert truncated == [True, False] and ids.shape == (2, 16)
    assert tokenizer.decode(ids[0]).endswith("Assistant:")  # the end of the prompt is kept
    assert mask[1].sum() < 16 and mask[1, -1] == 1  # left padding


def test_generation_is_seeded():
    tokenizer = models.load_tokenizer(models.TINY_MODEL)
    model = models.load_causal_lm(models.TINY_MODEL, tokenizer, device="cpu")
    prompts = [[{"role": "user", "content": "Review the film"}]] * 3
    a = sequences.generate(model, tokenizer, prompts, max_new_tokens=8, seed=1)
    b = sequences.generate(model, tokenizer, prompts, max_new_tokens=8, seed=1)
    assert [s.response_ids for s in a] == [s.response_ids for s in b]
    assert all(len(s.response_ids) <= 8 for s in a)


def test_a_sampled_pad_token_stays_in_the_response(monkeypatch):
    """A response ends at its first EOS, not at a pad token the policy happened to sample (SmolLM2's pad is a
    real token): the sample's ids, and so its KL, are exactly what was sampled."""
    tokenizer = models.load_tokenizer(models.TINY_MODEL)
    model = models.load_causal_lm(models.TINY_MODEL, tokenizer, device="cpu")
    prompts = [[{"role": "user", "content": "Review the film"}]]
    queries, _, _ = sequences.encode_prompts(tokenizer, prompts, 256)
    good, pad, eos = tokenizer.convert_tokens_to_ids("good"), tokenizer.pad_token_id, tokenizer.eos_token_id
    sampled = torch.cat([queries, torch.tensor([[good, pad, good, eos, pad, pad]])], 1)
    responses = sampled[:, queries.shape[1] :]
    monkeypatch.setattr(sequences, "sample_ids", lambda *args, **kwargs: sequences.Sampled(responses))
    [sample] = sequences.generate(model, tokenizer, prompts, max_new_tokens=6)
    assert sample.response_ids == [good, pad, good, eos] and sample.has_eos


MALLOC_PROBE = """
import ctypes
import rlhf_toy, torch

class MallInfo2(ctypes.Structure):  # <malloc.h>: the heap's statistics, in bytes
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = MallInfo2
block = torch.ones(16 * 2**20)  # 64 MB
mmapped = mallinfo2().hblkhd
del block
print(mmapped, mallinfo2().fordblks)
"""


def test_freed_tensor_memory_stays_with_the_process_unless_the_user_tunes_malloc():
    """`rlhf_toy.keep_freed_memory` (run at import): a 64 MB tensor comes from malloc's heap, not its own mmap, and
    once freed its memory stays in the heap for the next tensor. A user's own MALLOC_* setting leaves glibc as it
    was: the tensor is mmapped and its memory goes back to the kernel on free."""
    import ctypes.util
    import os
    import subprocess
    import sys

    libc = ctypes.util.find_library("c")
    if sys.platform != "linux" or not libc or not hasattr(ctypes.CDLL(libc), "mallinfo2"):
        pytest.skip("glibc >= 2.33 only")

    # the probe's own environment: none of this machine's malloc settings, only the one a case gives
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}

    def mmapped_and_free_after(**env) -> tuple[int, int]:
        out = subprocess.run(
            [sys.executable, "-c", MALLOC_PROBE],
            env={**clean, **env},
            capture_output=True,
            text=True,
            check=True,
        )
        mmapped, free_in_heap = map(int, out.stdout.split())
        return mmapped, free_in_heap

    size = 64 * 2**20
    mmapped, free_in_heap = mmapped_and_free_after()
    assert mmapped < size <= free_in_heap
    mmapped, free_in_heap = mmapped_and_free_after(MALLOC_ARENA_MAX="8")
    assert free_in_heap < size <= mmapped


def _attention_kernels(model, ids, mask, grad: bool):
    """The SDPA kernels one bf16-autocast forward (and its backward, with `grad`) of `model` calls, and its logits."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=mask).logits
        if grad:
            logits.float().square().mean().backward()
    names = [e.key for e in prof.key_averages()]
    count = {e.key: e.count for e in prof.key_averages()}
    return {
        "flash": count.get("aten::_scaled_dot_product_flash_attention_for_cpu", 0),
        "flash_backward": sum(count[n] for n in names if "flash_attention_for_cpu_backward" in n),
        "math": count.get("aten::_scaled_dot_product_attention_math", 0),
    }, logits.detach().float()


def test_training_attention_takes_matmuls_only_where_a_bf16_backward_runs_through_it(tmp_path):
    """On a CPU, the flash kernel's bf16 backward is the slow one: a trained block's attention runs the math
    backend, a frozen block's, evaluation's and sampling's stay on flash; the logits and gradients are the same
    within bf16 rounding, float32 is untouched, and the saved model carries none of it."""
    from conftest import make_tiny_llama

    from rlhf_toy.stages.common import freeze_bottom

    torch.manual_seed(0)
    ids = torch.randint(0, 100, (4, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding (the sampler's), which only a padding mask keeps out
    mask[1, 9:] = 0
    plain = make_tiny_llama(100)
    ours = models.with_training_attention(make_tiny_llama(100))
    assert ours.config._attn_implementation == models.TRAINING_ATTENTION
    freeze_bottom(plain, 1)
    freeze_bottom(ours, 1)

    kernels, logits = _attention_kernels(ours, ids, mask, grad=True)
    assert kernels == {"flash": 1, "flash_backward": 0, "math": 1}  # block 0 frozen, block 1 trained
    plain_kernels, plain_logits = _attention_kernels(plain, ids, mask, grad=True)
    assert plain_kernels == {"flash": 2, "flash_backward": 1, "math": 0}
    real = mask.bool()
    torch.testing.assert_close(logits[real], plain_logits[real], atol=0.05, rtol=0.05)
    for (name, p), q in zip(ours.named_parameters(), plain.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=0.05, rtol=0.05, msg=name)

    assert _attention_kernels(ours, ids, mask, grad=False)[0] == {"flash": 2, "flash_backward": 0, "math": 0}

    # float32 takes SDPA's own choice: the same logits and gradients to the bit
    ours.zero_grad()
    plain.zero_grad()
    with torch.no_grad():
        assert torch.equal(
            ours(input_ids=ids, attention_mask=mask).logits, plain(input_ids=ids, attention_mask=mask).logits
        )
    ours(input_ids=ids, attention_mask=mask).logits.square().mean().backward()
    plain(input_ids=ids, attention_mask=mask).logits.square().mean().backward()
    assert all(
        torch.equal(p.grad, q.grad) for p, q in zip(ours.parameters(), plain.parameters()) if p.requires_grad
    )

    ours.save_pretrained(tmp_path)
    assert "attn" not in (tmp_path / "config.json").read_text()
    assert models.causal_lm_from(str(tmp_path), torch.float32).config._attn_implementation == "sdpa"
