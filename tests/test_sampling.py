"""The decode loop (`sequences.sample_ids`) every stage samples with: the same tokens as transformers' `generate`
where both are deterministic, the log-probs of a full forward pass, and the draw from `generate`'s distribution."""

import contextlib
import copy

import pytest
import torch
from conftest import make_tiny_llama
from scipy import stats

from rlhf_toy import models, sequences
from rlhf_toy.evaluation.sample_and_score import Sampling, sample_and_score
from rlhf_toy.scoring import Judge


@pytest.fixture(scope="module")
def tiny():
    tokenizer = models.load_tokenizer(models.TINY_MODEL)
    model = models.load_causal_lm(models.TINY_MODEL, tokenizer, device="cpu").eval()
    prompts = [[{"role": "user", "content": "Review the film " + "again " * i}] for i in range(6)]
    queries, query_mask, _ = sequences.encode_prompts(tokenizer, prompts, 64)
    return model, tokenizer, queries, query_mask


def ending_token(model, queries, query_mask, seed: int) -> int:
    """Row 0's 4th token when sampled with `seed` and no EOS: made the EOS, the same draws end row 0 by its 4th
    step while the other rows go on, so rows leave the batch at different steps."""
    torch.manual_seed(seed)
    out = sequences.sample_ids(
        model, queries, query_mask, max_new_tokens=4, temperature=0.7, eos_token_id=None, pad_token_id=0
    )
    return out.responses[0, 3].item()


def greedy_generate(model, queries, query_mask, eos, pad, new_tokens):
    out = model.generate(
        input_ids=queries,
        attention_mask=query_mask,
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    responses = out[:, queries.shape[1] :]
    return responses if eos is None else sequences.truncate_at_eos(responses, eos, pad)[0]


def test_greedy_tokens_equal_generate_as_rows_end(tiny):
    """Temperature 0 takes the RNG out: what is left is the cache, the mask and the positions, row by row as rows
    leave the batch. An EOS at the argmax of some row makes rows end at different steps."""
    model, tokenizer, queries, query_mask = tiny
    pad = tokenizer.pad_token_id
    free = greedy_generate(model, queries, query_mask, None, pad, 10)
    eos = free[0, -1].item()  # the tiny model's greedy rows reach this token at different steps
    expected = greedy_generate(model, queries, query_mask, eos, pad, 10)
    ours = sequences.sample_ids(
        model, queries, query_mask, max_new_tokens=10, temperature=0, eos_token_id=eos, pad_token_id=pad
    )
    mask = sequences.truncate_at_eos(expected, eos, pad)[1]
    assert len(set(mask.sum(1).tolist())) > 1
    assert torch.equal(ours.responses, expected[:, : ours.responses.shape[1]])
    assert (expected[:, ours.responses.shape[1] :] == pad).all()  # generate's extra columns are all pad


def test_sampled_logprobs_equal_a_full_forward_pass(tiny):
    model, tokenizer, queries, query_mask = tiny
    eos = ending_token(model, queries, query_mask, seed=1)
    torch.manual_seed(1)
    out = sequences.sample_ids(
        model,
        queries,
        query_mask,
        max_new_tokens=12,
        temperature=0.7,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        output_logits=True,
        output_logprobs=True,
    )
    responses, mask = sequences.truncate_at_eos(out.responses, eos, tokenizer.pad_token_id)
    assert torch.equal(responses, out.responses)  # nothing after a row's EOS but pad
    assert len(set(mask.sum(1).tolist())) > 1
    ids, attention = torch.cat([queries, responses], 1), torch.cat([query_mask, mask.long()], 1)
    forward = sequences.logprobs_from_scaled(
        sequences.response_logits(model, ids, attention, queries.shape[1], temperature=0.7), responses
    )
    sampled = sequences.logprobs_from_scaled(sequences.scale_logits(out.logits, 0.7), responses)
    torch.testing.assert_close(sampled[mask], forward[mask], atol=1e-5, rtol=0)
    # the loop's own log-probs (output_logprobs): the same, each row's after its EOS 0
    torch.testing.assert_close(out.logprobs[mask], forward[mask], atol=1e-5, rtol=0)
    assert (out.logprobs[~mask] == 0).all() and (out.logprobs[mask] < 0).all()


@pytest.mark.parametrize("precision", ["float32", "bfloat16-mixed"])
def test_an_evaluations_kl_takes_the_policys_log_probs_from_sampling(tiny, precision, monkeypatch):
    """sample_and_score's KL(π‖π_ref) needs log π of each sampled token: the sampler's own, so only the reference runs a
    forward pass. In float32 they are a forward pass's, and so the KL two forward passes give, token by token; under
    bf16 autocast they differ from a forward pass's by its rounding only."""
    model, tokenizer, _, _ = tiny
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts = [[{"role": "user", "content": f"Review film number {i}"}] for i in range(5)]
    compute = torch.float32 if precision == "float32" else torch.bfloat16
    sampling = Sampling(
        max_new_tokens=6,
        temperature=0.7,
        batch_size=3,
        seed=0,
        precision=models.Precision(precision, torch.float32, compute, "cpu"),
    )
    forwards = []
    token_logprobs = sequences.token_logprobs
    monkeypatch.setattr(
        sequences, "token_logprobs", lambda m, *a, **k: forwards.append(m) or token_logprobs(m, *a, **k)
    )
    _, rows = sample_and_score(model, tokenizer, prompts, sampling, judge=Judge(None), ref=ref)
    assert forwards == [ref]
    ids = [
        r["response_ids"]
        for r in sample_and_score(model, tokenizer, prompts, sampling, judge=Judge(None), keep_ids=True)[1]
    ]
    settings = dict(temperature=0.7, batch_size=3, precision=sampling.precision)
    logp, token_logp = token_logprobs(model, tokenizer, prompts, ids, **settings)
    ref_logp = token_logprobs(ref, tokenizer, prompts, ids, **settings)[0]
    tolerance = 1e-4 if precision == "float32" else 1e-2  # bf16: 6 tokens' rounding
    assert [r["logp"] for r in rows] == pytest.approx(logp, abs=tolerance)
    assert [r["kl"] for r in rows] == pytest.approx([a - b for a, b in zip(logp, ref_logp)], abs=tolerance)
    assert [r["token_view"]["k1"] for r in rows] != [
        [0.0] * len(t) for t in token_logp
    ]  # the reference differs


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 4, 1.0), (1.0, 0, 0.8), (0.9, 5, 0.7)]
)
def test_draws_follow_generates_distribution(temperature, top_k, top_p):
    """A chi-square goodness-of-fit test of 40 000 draws against the probabilities transformers' own warpers
    give (temperature, top-k, top-p, softmax): it fails for a wrong temperature, a filter that keeps a token it
    should drop or an off-by-one in the inverse CDF."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    expected = warpers(None, logits.clone()).double().softmax(-1)[0]
    n = 40_000
    torch.manual_seed(0)
    draws = sequences.next_token(logits.expand(n, -1), temperature=temperature, top_k=top_k, top_p=top_p)
    counts = torch.bincount(draws, minlength=logits.shape[1]).double()
    assert (counts[expected == 0] == 0).all()  # filtered tokens are never drawn
    support = expected > 0
    _, p_value = stats.chisquare(
        counts[support].numpy(), (n * expected[support] / expected[support].sum()).numpy()
    )
    assert p_value > 1e-4


def test_synced_stepping_keeps_rows_and_gives_the_same_answers(tiny, tmp_path, monkeypatch):
    """With weights sharded across processes every process steps until all have ended (rows kept, pad fed):
    the answers are the ones the row-dropping loop gives from the same seed, greedy or sampled (each step draws
    one uniform for every row, so the RNG does not see when rows leave). One gloo process stands in for the group.
    Synced, the prompts' shared prefix gets no forward of its own (the processes' prompts differ, and each forward
    is a collective): the first forward is the whole batch's, where the unsynced loop shares the prefix."""
    model, tokenizer, queries, query_mask = tiny
    pad = tokenizer.pad_token_id
    monkeypatch.setattr(sequences, "SHARED_PREFIX_MIN_SAVED", 1)  # the tiny template's short shared prefix
    first_forward = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kwargs: first_forward.append(kwargs["input_ids"].shape) if not first_forward else None,
        with_kwargs=True,
    )
    greedy_eos = greedy_generate(model, queries, query_mask, None, pad, 10)[0, -1].item()
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        for temperature, seed in ((0, 0), (0.7, 1), (0.7, 2)):
            eos = ending_token(model, queries, query_mask, seed) if temperature else greedy_eos
            settings = dict(max_new_tokens=10, temperature=temperature, eos_token_id=eos, pad_token_id=pad)
            torch.manual_seed(seed)
            first_forward.clear()
            synced = sequences.sample_ids(model, queries, query_mask, synced_gpus=True, **settings)
            assert first_forward == [queries.shape]
            torch.manual_seed(seed)
            first_forward.clear()
            dropped = sequences.sample_ids(model, queries, query_mask, **settings)
            assert first_forward[0][0] == 1
            ends = sequences.truncate_at_eos(dropped.responses, eos, pad)[1].sum(1)
            assert len(set(ends.tolist())) > 1  # rows left the batch at different steps
            assert torch.equal(synced.responses, dropped.responses)
    finally:
        hook.remove()
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("which", ["tiny", "tiny_llama"])
def test_the_prompts_shared_prefix_goes_through_the_model_once(which, request, monkeypatch):
    """The chat template's system prompt and turn markers, the same in every prompt, go through the model in a
    forward of one row, their keys and values copied to every row; the rest of each prompt follows in one forward of
    the batch. The answers are those of the whole prompts' prefill as rows leave, their logits equal within float32
    rounding, and the log-probs of the sampled tokens equal a full forward's."""
    model, tokenizer, _, _ = request.getfixturevalue(which)
    pad = tokenizer.pad_token_id
    system = {"role": "system", "content": "You are a film critic. You write short, fair reviews of films."}
    prompts = [[system, {"role": "user", "content": "Review the film " + "again " * i}] for i in range(6)]
    queries, query_mask, _ = sequences.encode_prompts(tokenizer, prompts, 64)
    prefix = sequences.shared_prefix_length(queries, query_mask)
    assert prefix * (queries.shape[0] - 1) >= sequences.SHARED_PREFIX_MIN_SAVED
    eos = ending_token(model, queries, query_mask, seed=5)
    shapes = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )

    def sample(shared: bool):
        with monkeypatch.context() as patch:
            if not shared:
                patch.setattr(sequences, "SHARED_PREFIX_MIN_SAVED", float("inf"))
            shapes.clear()
            torch.manual_seed(5)
            out = sequences.sample_ids(
                model,
                queries,
                query_mask,
                max_new_tokens=10,
                temperature=0.7,
                eos_token_id=eos,
                pad_token_id=pad,
                output_logits=True,
                output_hidden_states=True,
            )
            return out, list(shapes)

    (shared, shared_shapes), (whole, whole_shapes) = sample(True), sample(False)
    hook.remove()
    batch, width = queries.shape
    assert shared_shapes[:2] == [(1, prefix), (batch, width - prefix)] and whole_shapes[0] == (batch, width)
    assert shared_shapes[2:] == whole_shapes[1:]  # the same decode steps, rows leaving at the same ones
    responses, mask = sequences.truncate_at_eos(shared.responses, eos, pad)
    assert len(set(mask.sum(1).tolist())) > 1
    assert torch.equal(shared.responses, whole.responses)
    torch.testing.assert_close(shared.logits, whole.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(shared.hidden, whole.hidden, rtol=0, atol=1e-5)
    ids, attention = torch.cat([queries, responses], 1), torch.cat([query_mask, mask.long()], 1)
    forward = sequences.logprobs_from_scaled(
        sequences.response_logits(model, ids, attention, width, temperature=0.7), responses
    )
    sampled = sequences.logprobs_from_scaled(sequences.scale_logits(shared.logits, 0.7), responses)
    torch.testing.assert_close(sampled[mask], forward[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "prompts, expected",
    [
        ([[5, 6, 7, 8], [5, 6, 9]], 2),  # the common start
        ([[5, 6, 7], [5, 6, 7], [5, 6, 7, 8]], 2),  # identical prompts: the shortest keeps its last token
        ([[5, 6], [5, 6, 7, 8, 9]], 1),  # one prompt the start of another
        ([[4, 6, 7], [5, 6, 7]], 0),  # the same ends are no prefix
        ([[0, 0, 7], [0, 7, 7, 7]], 1),  # a real token equal to the pad id is still a token
        ([[5, 6, 7, 8]], 0),  # one prompt shares with nothing
        ([[5], [5, 6]], 0),  # a one-token prompt keeps its token
    ],
)
def test_shared_prefix_length_of_left_padded_prompts(prompts, expected):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    assert sequences.shared_prefix_length(ids, mask) == expected


def test_every_row_ended_stops_the_loop(tiny):
    """A row whose first token is its EOS: one step, no column of pad after it."""
    model, tokenizer, queries, query_mask = tiny
    pad = tokenizer.pad_token_id
    eos = greedy_generate(model, queries[:1], query_mask[:1], None, pad, 1)[0, 0].item()
    out = sequences.sample_ids(
        model,
        queries[:1],
        query_mask[:1],
        max_new_tokens=10,
        temperature=0,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    assert out.responses.tolist() == [[eos]]


def test_whole_answers_follow_the_policy_so_k1_averages_to_the_exact_kl(tiny):
    """Over whole answers (rows ending at their EOS, the cache cut as they leave), the mean of the k1 estimator of
    the sequence KL, log π(y) − log π_ref(y), is the exact KL summed over the sampled positions only when y is
    drawn from π at the temperature the log-probs use: 2304 answers, within 4 standard errors (sampling at 0.9
    for log-probs at 0.7 misses by ~6)."""
    model, tokenizer, queries, query_mask = tiny
    model = copy.deepcopy(model)
    with torch.no_grad():
        # the tiny model's next-token distributions are nearly uniform (logits' std 0.1), where a wrong temperature
        # changes little; 20x the final norm's scale gives them a peak (std 2.3, top token up to 0.97)
        model.transformer.ln_f.weight.mul_(20)
        reference = copy.deepcopy(model)
        generator = torch.Generator().manual_seed(0)
        for p in reference.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    eos, pad, temperature = ending_token(model, queries, query_mask, seed=1), tokenizer.pad_token_id, 0.7
    queries, query_mask = queries.repeat(8, 1), query_mask.repeat(8, 1)
    torch.manual_seed(3)
    differences, exact_kls, lengths = [], [], []
    with torch.no_grad():
        for _ in range(48):
            out = sequences.sample_ids(
                model,
                queries,
                query_mask,
                max_new_tokens=12,
                temperature=temperature,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            responses, mask = sequences.truncate_at_eos(out.responses, eos, pad)
            ids, attention = torch.cat([queries, responses], 1), torch.cat([query_mask, mask.long()], 1)
            z = sequences.response_logits(model, ids, attention, queries.shape[1], temperature=temperature)
            z_ref = sequences.response_logits(
                reference, ids, attention, queries.shape[1], temperature=temperature
            )
            k1 = sequences.logprobs_from_scaled(z, responses) - sequences.logprobs_from_scaled(
                z_ref, responses
            )
            exact = sequences.exact_kl(z, z_ref)
            differences.append(((k1 - exact) * mask).sum(1))
            exact_kls.append((exact * mask).sum(1))
            lengths.append(mask.sum(1))
    difference, exact_kl = torch.cat(differences), torch.cat(exact_kls)
    assert len(set(torch.cat(lengths).tolist())) > 1  # rows ended at different steps
    standard_error = difference.std() / len(difference) ** 0.5
    assert exact_kl.mean() > 10 * standard_error  # a KL the test can tell from zero
    assert difference.mean().abs() < 4 * standard_error, (difference.mean(), standard_error, exact_kl.mean())


def test_frozen_weights_sample_as_trainable_ones_under_bf16_autocast_and_stay_frozen(tiny):
    """`sample_ids` marks frozen weights as requiring grad for the loop, so autocast casts each one to bf16 once
    and not at every step: the answers and logits are the trainable model's, bit for bit, and afterwards the
    frozen weights are frozen again (also when the loop fails)."""
    model, tokenizer, queries, query_mask = tiny
    model = copy.deepcopy(model)
    frozen = [model.transformer.wte, *model.transformer.h[:1]]
    settings = dict(max_new_tokens=8, temperature=0.7, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    results = []
    for freeze in (False, True):
        for module in frozen:
            module.requires_grad_(not freeze)
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(sequences.sample_ids(model, queries, query_mask, output_logits=True, **settings))
    assert torch.equal(results[0].responses, results[1].responses)
    assert torch.equal(results[0].logits, results[1].logits)
    frozen_params = [p for module in frozen for p in module.parameters()]
    assert not any(p.requires_grad for p in frozen_params)
    assert all(p.requires_grad for p in model.transformer.h[1].parameters())

    def fail(*_):
        raise ValueError("a forward that fails mid-loop")

    model.transformer.h[1].register_forward_hook(fail)
    with pytest.raises(ValueError), torch.autocast("cpu", dtype=torch.bfloat16):
        sequences.sample_ids(model, queries, query_mask, **settings)
    assert not any(p.requires_grad for p in frozen_params)


@pytest.fixture(scope="module")
def tiny_llama(tiny):
    """A random Llama (`make_tiny_llama`) on the tiny model's prompts."""
    _, tokenizer, queries, query_mask = tiny
    return make_tiny_llama(len(tokenizer)), tokenizer, queries, query_mask


@pytest.mark.skipif(
    not models.cpu_has_native_bf16(), reason="packing is for CPUs with native bf16 (none here)"
)
def test_bf16_linears_packed_for_the_loop_sample_the_same_tokens_and_logits_and_are_unpacked_after(
    tiny_llama, monkeypatch
):
    """Under bf16 autocast each nn.Linear runs from a weight packed once for the loop (the LM head included): the
    answers are those of the unpacked loop and the logits equal within bf16 rounding (oneDNN may block a product's
    sum another way for a packed weight), the modules are unpacked afterwards (also when the loop fails)."""
    model, tokenizer, queries, query_mask = tiny_llama
    settings = dict(max_new_tokens=8, temperature=0.7, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert model.lm_head in linears
    packed_calls = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: packed_calls.append("forward" in vars(m))) for m in linears
    ]

    def sample(packing: bool, autocast: bool = True):
        if not packing:
            monkeypatch.setattr(sequences, "linears_packed_once", lambda *a, **k: contextlib.nullcontext())
        packed_calls.clear()
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = sequences.sample_ids(model, queries, query_mask, output_logits=True, **settings)
        monkeypatch.undo()
        return out, set(packed_calls)

    (packed, calls), (plain, plain_calls) = sample(True), sample(False)
    assert calls == {True} and plain_calls == {False}  # every Linear call went through its packed weight
    assert torch.equal(packed.responses, plain.responses)
    # bf16 has 8 significant bits: products summed in another order differ by about 2^-7 of their size
    torch.testing.assert_close(packed.logits, plain.logits, rtol=1.6e-2, atol=1.6e-2)
    assert not any("forward" in vars(m) for m in linears)

    fail = model.model.layers[1].register_forward_hook(
        lambda *_: (_ for _ in ()).throw(ValueError("mid-loop"))
    )
    with pytest.raises(ValueError), torch.autocast("cpu", dtype=torch.bfloat16):
        sequences.sample_ids(model, queries, query_mask, **settings)
    fail.remove()
    for hook in hooks:
        hook.remove()
    assert not any("forward" in vars(m) for m in linears)


@pytest.mark.skipif(
    not torch.backends.mkl.is_available(), reason="float32 packing is MKL's (not in this build)"
)
def test_float32_linears_packed_for_the_loop_sample_the_same_answers_as_rows_leave(tiny_llama, monkeypatch):
    """In float32 each nn.Linear runs from a weight MKL packed once for the loop's rows: the answers and logits are
    those of the unpacked loop (within float32 rounding) while rows leave the batch, every decode step's products
    went through the packed weights, padded to the batch while at least three quarters of its rows run, and the
    modules are unpacked afterwards. Nothing is packed for MKL past 32 rows or under autocast."""
    # MKL's packing is the rule on Intel CPUs (on others the sampler packs with oneDNN)
    monkeypatch.setattr(sequences, "cpu_vendor", lambda: "GenuineIntel")
    model, tokenizer, queries, query_mask = tiny_llama
    batch = queries.shape[0]
    settings = dict(
        max_new_tokens=8, temperature=0.7, pad_token_id=tokenizer.pad_token_id, output_logits=True
    )
    eos = ending_token(model, queries, query_mask, seed=3)
    packed_rows = []
    mkl_linear = torch.ops.mkl._mkl_linear

    def counted(x, packed, weight, bias, rows):
        packed_rows.append(x.shape[0])
        return mkl_linear(x, packed, weight, bias, rows)

    def sample(packing: bool):
        with monkeypatch.context() as patch:
            patch.setattr(torch.ops.mkl, "_mkl_linear", counted)
            if not packing:
                patch.setattr(sequences, "linears_packed_once", lambda *a, **k: contextlib.nullcontext())
            torch.manual_seed(3)
            return sequences.sample_ids(model, queries, query_mask, eos_token_id=eos, **settings)

    packed = sample(True)
    assert set(packed_rows) == {batch}  # every packed product had the batch's rows, padded when some had left
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    plain = sample(False)
    lengths = sequences.truncate_at_eos(packed.responses, eos, tokenizer.pad_token_id)[1].sum(1)
    assert len(set(lengths.tolist())) > 1  # rows left the batch at different steps
    running = [int((lengths > step).sum()) for step in range(1, int(lengths.max()))]
    # every Linear of each decode step with three quarters of the rows running, and the prefill's LM head (its
    # last position only: the batch's rows)
    assert len(packed_rows) == linears * sum(4 * rows >= 3 * batch for rows in running) + 1
    assert any(4 * rows >= 3 * batch for rows in running if rows < batch)  # padding was used
    assert torch.equal(packed.responses, plain.responses)
    torch.testing.assert_close(packed.logits, plain.logits, rtol=1e-5, atol=1e-5)
    assert not any("forward" in vars(m) for m in model.modules())

    # a batch past FLOAT32_PACKED_MAX_ROWS (compute-bound products) is not packed
    with sequences.linears_packed_once(
        model, "cpu", sharded=False, rows=sequences.FLOAT32_PACKED_MAX_ROWS + 1
    ):
        assert not any("forward" in vars(m) for m in model.modules())
    with sequences.linears_packed_once(model, "cpu", sharded=False, rows=sequences.FLOAT32_PACKED_MAX_ROWS):
        assert all("forward" in vars(m) for m in model.modules() if type(m) is torch.nn.Linear)
    # under bf16 autocast on a CPU without native bf16 the float32 weights stay with autocast's F.linear
    packed_rows.clear()
    monkeypatch.setattr(sequences, "cpu_has_native_bf16", lambda: False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sample(True)
    assert packed_rows == []


@pytest.mark.parametrize(
    "vendor, onednn", [("GenuineIntel", False), ("AuthenticAMD", True), ("HygonGenuine", True), (None, False)]
)
def test_float32_packs_with_onednn_on_x86_cpus_not_made_by_intel(monkeypatch, vendor, onednn):
    monkeypatch.setattr(sequences, "cpu_vendor", lambda: vendor)
    assert sequences.float32_packs_with_onednn() is (onednn and torch.backends.mkldnn.is_available())
    # at any batch size there, as far as the MKL rule allows elsewhere
    big = sequences.FLOAT32_PACKED_MAX_ROWS + 1
    assert sequences.packs_on_cpu(torch.float32, big) is sequences.float32_packs_with_onednn()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not in this build")
def test_float32_linears_packed_by_onednn_sample_the_same_answers(tiny_llama, monkeypatch):
    """On a CPU not made by Intel each float32 nn.Linear runs from a weight oneDNN packed once for the loop, at any
    batch size: the answers and logits are those of the unpacked loop (within float32 rounding), every product of
    every decode step went through the packed weights, and the modules are unpacked afterwards. Not under
    autocast."""
    monkeypatch.setattr(sequences, "cpu_vendor", lambda: "AuthenticAMD")
    model, tokenizer, queries, query_mask = tiny_llama
    settings = dict(
        max_new_tokens=8, temperature=0.7, pad_token_id=tokenizer.pad_token_id, output_logits=True
    )
    eos = ending_token(model, queries, query_mask, seed=3)
    products = []
    pointwise = torch.ops.mkldnn._linear_pointwise

    def counted(x, packed, *args):
        products.append((x.dtype, packed.dtype))
        return pointwise(x, packed, *args)

    def sample(packing: bool):
        with monkeypatch.context() as patch:
            patch.setattr(torch.ops.mkldnn, "_linear_pointwise", counted)
            if not packing:
                patch.setattr(sequences, "linears_packed_once", lambda *a, **k: contextlib.nullcontext())
            torch.manual_seed(3)
            return sequences.sample_ids(model, queries, query_mask, eos_token_id=eos, **settings)

    packed = sample(True)
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    steps = int(sequences.truncate_at_eos(packed.responses, eos, tokenizer.pad_token_id)[1].sum(1).max())
    # every Linear of the prefill and of each decode step after it, in float32
    assert len(products) >= linears * steps and set(products) == {(torch.float32, torch.float32)}
    plain = sample(False)
    assert torch.equal(packed.responses, plain.responses)
    torch.testing.assert_close(packed.logits, plain.logits, rtol=1e-5, atol=1e-5)
    assert not any("forward" in vars(m) for m in model.modules())
    with sequences.linears_packed_once(
        model, "cpu", sharded=False, rows=sequences.FLOAT32_PACKED_MAX_ROWS + 1
    ):
        assert all("forward" in vars(m) for m in model.modules() if type(m) is torch.nn.Linear)
    products.clear()
    monkeypatch.setattr(sequences, "cpu_has_native_bf16", lambda: False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sample(True)
    assert products == []


@pytest.mark.skipif(
    not torch.backends.mkl.is_available(), reason="float32 packing is MKL's (not in this build)"
)
@pytest.mark.parametrize("rows", [8, 7, 6, 2, 1, 12])
def test_a_float32_packed_linear_is_f_linear_at_any_row_count(rows):
    """Packed for 8 rows: 6 to 8 rows (padded) and fewer or more (through F.linear) give F.linear's product, in the
    input's leading shape, with a bias."""
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 32), torch.randn(48)
    packed = sequences.pack_float32(weight, 8)
    x = torch.randn(rows, 1, 32)
    out = sequences.packed_linear_float32(x, packed, weight, bias, rows=8)
    assert out.shape == (rows, 1, 48)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_generate_leaves_the_global_random_stream_alone(tiny):
    """`generate` seeds its own generator per batch: what ran before it does not change its answers, and it does
    not move torch's global random stream, so a run that evaluates before training draws the same rollouts as
    one that does not."""
    model, tokenizer, _, _ = tiny
    prompts = [[{"role": "user", "content": f"Review the film number {i}"}] for i in range(5)]
    settings = dict(max_new_tokens=6, temperature=1.0, batch_size=2, seed=3)
    torch.manual_seed(0)
    first = sequences.generate(model, tokenizer, prompts, **settings)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    second = sequences.generate(model, tokenizer, prompts, **settings)
    assert torch.equal(torch.get_rng_state(), state)
    assert [s.response_ids for s in first] == [s.response_ids for s in second]
    other = sequences.generate(model, tokenizer, prompts, **{**settings, "seed": 4})
    # the seed does choose the draws
    assert [s.response_ids for s in first] != [s.response_ids for s in other]


@pytest.mark.parametrize("which", ["tiny", "tiny_llama"])
def test_bf16_cache_holds_keys_as_attention_reads_them(which, request, monkeypatch):
    """Under bf16 autocast the preallocated cache stores keys and values in bf16 (Llama's rotary embedding makes
    float32 keys, which attention then cast again at every step): the same tokens and logits, bit for bit, as
    transformers' own cache, which stores them as computed."""
    model, tokenizer, queries, query_mask = request.getfixturevalue(which)
    settings = dict(max_new_tokens=8, temperature=0.7, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    results = []
    for own_cache in (True, False):
        if not own_cache:
            from transformers import DynamicCache

            monkeypatch.setattr(
                sequences, "preallocated_cache", lambda model, _: DynamicCache(config=model.config)
            )
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(sequences.sample_ids(model, queries, query_mask, output_logits=True, **settings))
    assert torch.equal(results[0].responses, results[1].responses)
    assert torch.equal(results[0].logits, results[1].logits)
