"""`sequences.forward_sharing_pair_prefixes`: DPO's and the reward model's pairs put each prompt through the model once,
for the same logits, scores and gradients as one forward of the padded rows; `sequences.AnswerWindow` and
`answer_logits`: DPO's logits at each answer only, for the same log-probs and gradients."""

import pytest
import torch
from conftest import ROOT, make_tiny_llama
from transformers import LlamaForSequenceClassification
from transformers.modeling_outputs import ModelOutput

from rlhf_toy import models, runlog, sequences
from rlhf_toy.scoring import load_reward_model

PAD = 0


def pairs_batch(vocab: int, seed: int = 0):
    """4 pairs, chosen then rejected, right-padded as TRL's collators pad them: prompts of different lengths, answers
    that share their first words or none, a rejected answer that is the chosen one cut short, a pair that differs in
    its prompt's last token only."""
    g = torch.Generator().manual_seed(seed)
    tokens = lambda n: torch.randint(1, vocab, (n,), generator=g).tolist()  # noqa: E731
    prompts = [tokens(7), tokens(4), tokens(9), tokens(5)]
    shared = tokens(3)
    chosen = [
        prompts[0] + shared + tokens(5),
        prompts[1] + tokens(6),
        prompts[2] + tokens(2),
        prompts[3] + tokens(4),
    ]
    rejected = [
        prompts[0] + shared + tokens(2),
        prompts[1] + tokens(9),
        chosen[2][:-1],  # the chosen answer cut short: all of it is the shared prefix but its last token
        prompts[3][:-1] + [prompts[3][-1] % (vocab - 1) + 1] + tokens(4),
    ]
    rows = chosen + rejected
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return input_ids, attention_mask


def test_pair_prefix_lengths_stop_short_of_each_pairs_shorter_row():
    input_ids, attention_mask = pairs_batch(50)
    assert sequences.pair_prefix_lengths(input_ids, attention_mask).tolist() == [10, 4, 9, 4]


def tiny_gpt2_lm():
    tokenizer = models.load_tokenizer(models.TINY_MODEL)
    return models.load_causal_lm(models.TINY_MODEL, tokenizer, device="cpu", dtype="float32")


def tiny_llama_classifier():
    return make_tiny_llama(50, LlamaForSequenceClassification, num_labels=1, pad_token_id=PAD)


def tiny_gpt2_classifier():
    return load_reward_model(models.TINY_MODEL, device="cpu", dtype="float32")


@pytest.mark.parametrize(
    "make_model",
    [tiny_gpt2_lm, lambda: make_tiny_llama(50), tiny_llama_classifier, tiny_gpt2_classifier],
    ids=["gpt2 lm", "llama lm", "llama classifier", "gpt2 classifier"],
)
def test_outputs_and_gradients_equal_one_forward_of_the_rows(make_model):
    model = make_model().train()
    model.config.pad_token_id = PAD
    for module in model.modules():  # dropout off: the two computations draw different masks
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    input_ids, attention_mask = pairs_batch(min(50, model.config.vocab_size))
    real = attention_mask.bool()
    weights = torch.randn(input_ids.shape[0])

    def loss_and_grads(forward):
        model.zero_grad(set_to_none=True)
        logits = forward().logits
        if logits.dim() == 3:  # what DPO reads: log-probs of each row's next tokens where the row is real
            logp = (
                torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
            )
            per_row = (logp * real[:, 1:]).sum(1)
        else:
            per_row = logits.squeeze(-1)
        (per_row * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), per_row.detach(), grads

    def shared_forward():  # a causal LM's trunk output, through its LM head here
        out = sequences.forward_sharing_pair_prefixes(model, input_ids, attention_mask)
        head = model.get_output_embeddings()
        return out if head is None else ModelOutput(logits=head(out.last_hidden_state))

    plain = loss_and_grads(lambda: model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False))
    shared = loss_and_grads(shared_forward)
    if plain[0].dim() == 3:
        assert shared[0].shape == plain[0].shape
        torch.testing.assert_close(shared[0][real], plain[0][real], atol=1e-5, rtol=1e-5)
        assert (shared[0][~real] == 0).all()
    torch.testing.assert_close(shared[1], plain[1], atol=1e-5, rtol=1e-5)
    assert shared[2].keys() == plain[2].keys() and len(plain[2]) > 0
    for name in plain[2]:
        torch.testing.assert_close(shared[2][name], plain[2][name], atol=1e-5, rtol=1e-4, msg=name)


def test_each_prompt_goes_through_the_model_once(monkeypatch):
    """Two forwards: the 4 prefixes (as wide as the longest), then the 8 rows' own tokens."""
    model = make_tiny_llama(50)
    input_ids, attention_mask = pairs_batch(50)
    shapes = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    sequences.forward_sharing_pair_prefixes(model, input_ids, attention_mask)
    own = (attention_mask.sum(1) - sequences.pair_prefix_lengths(input_ids, attention_mask).repeat(2)).max()
    assert shapes == [(4, 10), (8, int(own))]


def stage_metrics(out) -> list[dict]:
    keys = (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
        "entropy",
        "mean_token_accuracy",
        "num_tokens",
        "accuracy",
        "margin",
    )
    rows = runlog.read_jsonl(out / "metrics.jsonl")
    return [{k: r[k] for k in keys if k in r} for r in rows if "loss" in r]


def run_pairs_stage(stage, pipeline, out, **flags):
    """3 steps of the tiny DPO or reward stage from the pipeline's SFT model; its logged metrics."""
    from rlhf_toy.config import parse_config
    from rlhf_toy.stages.dpo import DPOStageConfig, run_dpo
    from rlhf_toy.stages.reward import RewardStageConfig, train_reward

    flags.update(model_name_or_path=pipeline / "sft/final", dataset=pipeline / "pairs.jsonl")
    flags.update(num_eval_prompts=0, max_steps=3, output_dir=out)
    if stage == "dpo":
        flags.update(config=ROOT / "configs/tiny/dpo.yaml", reward_model="none")
        config_class, train = DPOStageConfig, run_dpo
    else:
        flags.update(config=ROOT / "configs/tiny/reward.yaml", policy_model=pipeline / "sft/final")
        flags.update(train_prompts=pipeline / "prompts.jsonl", eval_prompts=pipeline / "prompts.jsonl")
        config_class, train = RewardStageConfig, train_reward
    train(parse_config(config_class, [str(x) for k, v in flags.items() for x in (f"--{k}", v)]))
    return stage_metrics(out)


def test_the_reward_stage_trains_as_it_would_with_each_row_whole(pipeline, tmp_path, monkeypatch):
    """TRL's RewardTrainer mixed with RewardPromptsOnce (`share_prompts`: true, or auto in float32): every step's
    pairs share their prompts, and training logs the losses and metrics it logs with TRL's forward of the padded rows
    (`--share_prompts false`)."""
    calls = []
    shared_forward = sequences.forward_sharing_pair_prefixes
    monkeypatch.setattr(
        sequences, "forward_sharing_pair_prefixes", lambda *a: calls.append(1) or shared_forward(*a)
    )
    shared = run_pairs_stage("reward", pipeline, tmp_path / "shared", share_prompts="true")
    assert len(calls) >= 3 and len(shared) == 3
    calls.clear()
    whole = run_pairs_stage("reward", pipeline, tmp_path / "whole", share_prompts="false")
    assert calls == [] and len(whole) == 3
    for a, b in zip(shared, whole):
        assert a.keys() == b.keys() and len(a) >= 3
        assert a == pytest.approx(b, abs=1e-4, rel=1e-4)


def test_dpo_trains_on_answer_windows_as_trl_does_on_the_whole_rows(pipeline, tmp_path, monkeypatch):
    """TRL's DPOTrainer mixed with DPOAnswerWindows: the reference pass and every step read each answer's logits only,
    with each pair's prompt through the model once (`share_prompts` true) or not (false), and training logs what TRL
    logs on its own (the windows turned off): the same losses, log-probs, implicit rewards, entropy, mean logits,
    token accuracy and token counts."""
    windows, shared = [], []
    answer_logits, shared_forward = sequences.answer_logits, sequences.forward_sharing_pair_prefixes
    monkeypatch.setattr(
        sequences,
        "answer_logits",
        lambda *a: windows.append(a[3].completion_mask().shape) or answer_logits(*a),
    )
    monkeypatch.setattr(
        sequences, "forward_sharing_pair_prefixes", lambda *a: shared.append(1) or shared_forward(*a)
    )
    runs = {}
    for share in ("true", "false"):
        runs[share] = run_pairs_stage("dpo", pipeline, tmp_path / share, share_prompts=share)
        # the reference pass's batches (1 at least) and the 3 steps, each with a window narrower than its rows
        assert len(windows) >= 4 and len(shared) == (len(windows) if share == "true" else 0)
        windows.clear(), shared.clear()
    # a reference model that runs in the loss (log-probs not precomputed) would read the window's ids: TRL's own
    runs["reference in the loss"] = run_pairs_stage(
        "dpo", pipeline, tmp_path / "no_precompute", precompute_ref_log_probs="false"
    )
    assert windows == [] and shared == []
    monkeypatch.setattr(sequences.AnswerWindow, "of", classmethod(lambda cls, mask: None))
    runs["trl"] = run_pairs_stage("dpo", pipeline, tmp_path / "trl", share_prompts="false")
    assert windows == [] and shared == []
    for name in ("true", "false", "reference in the loss"):
        assert len(runs[name]) == len(runs["trl"]) == 3
        for a, b in zip(runs[name], runs["trl"]):
            assert a.keys() == b.keys() and len(a) >= 10
            assert a == pytest.approx(b, abs=1e-4, rel=1e-4), name


@pytest.mark.parametrize("share_prompts", ["false", "true"])
def test_dpo_steps_start_above_its_frozen_blocks_and_train_as_trl_does(
    pipeline, tmp_path, monkeypatch, share_prompts
):
    """With its lowest block frozen, the tiny DPO stage's steps start from what that block output in the reference pass
    (`sequences.FrozenBottom`: every step's rows found), and training logs what TRL's own path logs."""
    served, lookup = [], sequences.FrozenBottom.lookup

    def spy(*args):
        below = lookup(*args)
        served.append(below is not None)
        return below

    monkeypatch.setattr(sequences.FrozenBottom, "lookup", spy)
    cached = run_pairs_stage(
        "dpo", pipeline, tmp_path / "cached", freeze_bottom_layers=1, share_prompts=share_prompts
    )
    assert len(served) >= 3 and all(served)
    monkeypatch.setattr(sequences.AnswerWindow, "of", classmethod(lambda cls, mask: None))
    trl = run_pairs_stage("dpo", pipeline, tmp_path / "trl", freeze_bottom_layers=1)
    assert len(cached) == len(trl) == 3
    for a, b in zip(cached, trl):
        assert a.keys() == b.keys() and len(a) >= 10
        assert a == pytest.approx(b, abs=1e-4, rel=1e-4)


def test_dpo_answer_windows_under_mixed_precision_run_the_head_in_bf16(pipeline, tmp_path, monkeypatch):
    """bfloat16-mixed: the LM head, which the windows run apart from the forward, computes in bf16 as it does inside
    it (the trainer's autocast around it); TRL reads the reference pass's logits in bf16 (the model not yet wrapped by
    accelerate) and the steps' in float32, as from the forward itself."""
    from accelerate.state import AcceleratorState

    logits_dtypes, head_dtypes = [], []
    answer_logits = sequences.answer_logits

    def spy(model, *args):
        if not head_dtypes:
            model.get_output_embeddings().register_forward_hook(
                lambda m, a, out: head_dtypes.append(out.dtype)
            )
        logits = answer_logits(model, *args)
        logits_dtypes.append(logits.dtype)
        return logits

    monkeypatch.setattr(sequences, "answer_logits", spy)
    try:
        run_pairs_stage("dpo", pipeline, tmp_path / "bf16", dtype="bfloat16-mixed", share_prompts="false")
    finally:  # accelerate keeps its first mixed precision for the process: the next trainer's is float32
        AcceleratorState._reset_state(reset_partial_state=True)
    assert set(head_dtypes) == {torch.bfloat16} and logits_dtypes[-3:] == [torch.float32] * 3
    assert logits_dtypes[0] == torch.bfloat16  # the reference pass


def test_answer_windows_hold_each_answer_left_aligned():
    """Rows with answers of 3, 1 and 0 tokens after prompts of different lengths, right-padded: each window is the
    token before the answer, then the answer; a mask whose answer is not one run has no window."""
    input_ids = torch.tensor([[11, 12, 13, 14, 15, 0], [21, 22, 23, 24, 0, 0], [31, 32, 0, 0, 0, 0]])
    completion_mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]])
    window = sequences.AnswerWindow.of(completion_mask)
    assert window.starts.tolist()[:2] == [1, 2] and window.lengths.tolist() == [3, 1, 0]
    assert window.ids(input_ids)[:2].tolist() == [[12, 13, 14, 15], [23, 24, 0, 0]]
    assert window.completion_mask().tolist() == [[0, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert sequences.AnswerWindow.of(torch.tensor([[0, 1, 0, 1, 0, 0]])) is None


def test_share_prompts_auto_means_float32_matmuls_and_anything_else_is_a_config_error(tmp_path):
    from rlhf_toy.config import ConfigError, parse_config
    from rlhf_toy.stages.dpo import DPOStageConfig
    from rlhf_toy.stages.reward import RewardStageConfig

    for config_class, name in ((DPOStageConfig, "dpo"), (RewardStageConfig, "reward")):
        flags = ["--config", str(ROOT / f"configs/{name}.yaml")]
        auto = parse_config(config_class, flags)
        assert auto.share_prompts == "auto" and auto.shares_prompts(True) and not auto.shares_prompts(False)
        for value, shares in (("true", True), ("false", False)):
            cfg = parse_config(config_class, [*flags, "--share_prompts", value])
            assert cfg.shares_prompts(True) is shares and cfg.shares_prompts(False) is shares
        yaml_bool = tmp_path / f"{name}.yaml"
        yaml_bool.write_text((ROOT / f"configs/{name}.yaml").read_text() + "share_prompts: false\n")
        assert not parse_config(config_class, ["--config", str(yaml_bool)]).shares_prompts(True)
        with pytest.raises(ConfigError, match="share_prompts must be auto, true or false, got 'sometimes'"):
            parse_config(config_class, [*flags, "--share_prompts", "sometimes"])


@pytest.mark.parametrize("share_prompts", [False, True], ids=["rows", "prompts once"])
@pytest.mark.parametrize("make_model", [tiny_gpt2_lm, lambda: make_tiny_llama(50)], ids=["gpt2", "llama"])
def test_the_lm_head_runs_only_where_its_logits_are_read(make_model, share_prompts):
    """DPO reads the logits that predict answer tokens: `answer_logits` runs the head there only (its input has that
    many rows), those logits and the gradients of the log-probs read from them are a whole forward's, and the rest of
    the window is 0."""
    model = make_model().train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    input_ids, attention_mask = pairs_batch(50)
    prompt = torch.tensor([7, 4, 9, 5] * 2)[:, None]  # pairs_batch's prompt lengths
    completion_mask = attention_mask * (torch.arange(input_ids.shape[1]) >= prompt)
    window = sequences.AnswerWindow.of(completion_mask)
    head_rows = []
    model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: head_rows.append(args[0].shape[0])
    )

    def read(logits, ids, mask):  # TRL's DPO: each row's answer log-probs, summed
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (logp * mask[:, 1:]).sum(1)

    def grads_of(per_row):
        model.zero_grad(set_to_none=True)
        (per_row * torch.arange(1.0, 9.0)).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    plain = read(plain_logits, input_ids, completion_mask)
    plain_grads = grads_of(plain)
    head_rows.clear()
    logits = sequences.answer_logits(model, input_ids, attention_mask, window, share_prompts)
    assert head_rows[-1] == int(completion_mask.sum())
    ids = window.ids(input_ids)
    windowed = read(logits, ids, window.completion_mask())
    torch.testing.assert_close(windowed, plain, atol=1e-5, rtol=1e-5)
    real = torch.arange(logits.shape[1]) < window.lengths[:, None]
    at = window.starts[:, None] + torch.arange(logits.shape[1])
    expected = plain_logits.detach().gather(
        1, at.clamp(max=input_ids.shape[1] - 1)[..., None].expand(*at.shape, plain_logits.shape[-1])
    )
    torch.testing.assert_close(logits.detach()[real], expected[real], atol=1e-5, rtol=1e-5)
    assert (logits[~real] == 0).all()
    window_grads = grads_of(windowed)
    assert window_grads.keys() == plain_grads.keys() and len(plain_grads) > 0
    for name in plain_grads:
        torch.testing.assert_close(window_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_answer_logits_come_in_the_dtype_the_models_forward_returns():
    """Under bf16 autocast a model's forward returns bf16 logits, and float32 ones once wrapped as accelerate's mixed
    precision wraps it (what TRL reads in training): the window's logits come in the same dtype, its head in bf16."""
    from accelerate.utils import convert_outputs_to_fp32

    model = make_tiny_llama(50)
    input_ids, attention_mask = pairs_batch(50)
    window = sequences.AnswerWindow.of(attention_mask * (torch.arange(input_ids.shape[1]) >= 9))
    head_dtypes = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: head_dtypes.append(out.dtype))
    for share_prompts in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = sequences.answer_logits(model, input_ids, attention_mask, window, share_prompts)
        assert logits.dtype == torch.bfloat16
    model.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward))
    for share_prompts in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = sequences.answer_logits(model, input_ids, attention_mask, window, share_prompts)
        assert logits.dtype == torch.float32
    assert set(head_dtypes) == {torch.bfloat16}


@pytest.mark.parametrize("make_model", [tiny_gpt2_lm, lambda: make_tiny_llama(50)], ids=["gpt2", "llama"])
def test_steps_start_above_the_frozen_blocks_with_the_same_logits_and_gradients(make_model):
    """`FrozenBottom`: what the frozen lowest block output for each row in a first pass (DPO's reference pass) stands
    in for it in later batches of the same rows, in another order and padded wider: the block does not run, and the
    logits and the gradients of the blocks above are a whole forward's. A batch with a row never seen runs it."""
    from rlhf_toy.stages.common import freeze_bottom

    model = make_model().train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    assert sequences.FrozenBottom.of(model, 1) is None  # nothing frozen yet: its output would change
    freeze_bottom(model, 1)
    bottom = sequences.FrozenBottom.of(model, 1)
    input_ids, attention_mask = pairs_batch(50)
    prompt = torch.tensor([7, 4, 9, 5] * 2)[:, None]
    completion_mask = attention_mask * (torch.arange(input_ids.shape[1]) >= prompt)
    window = sequences.AnswerWindow.of(completion_mask)
    with torch.no_grad(), bottom.recording(input_ids, attention_mask):
        sequences.answer_logits(model, input_ids, attention_mask, window, False)
    assert len(bottom.outputs) == 8
    order = torch.tensor(
        [5, 2, 7, 0, 1, 6, 3, 4]
    )  # a later batch: the same rows, shuffled, one more pad column
    ids = torch.cat([input_ids[order], torch.full((8, 1), PAD)], 1)
    mask = torch.cat([attention_mask[order], torch.zeros(8, 1, dtype=torch.long)], 1)
    window = sequences.AnswerWindow.of(
        torch.cat([completion_mask[order], torch.zeros(8, 1, dtype=torch.long)], 1)
    )
    lowest_ran = []
    models.transformer_blocks(model)[0].mlp.register_forward_hook(lambda *_: lowest_ran.append(1))

    def logits_and_grads(frozen_bottom):
        model.zero_grad(set_to_none=True)
        logits = sequences.answer_logits(model, ids, mask, window, False, frozen_bottom)
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, window.ids(ids)[:, 1:, None]).squeeze(-1)
        (logp * window.completion_mask()[:, 1:] * torch.arange(1.0, 9.0)[:, None]).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    cached = logits_and_grads(bottom)
    assert lowest_ran == []
    whole = logits_and_grads(None)
    assert lowest_ran == [1]
    torch.testing.assert_close(cached[0], whole[0], atol=1e-5, rtol=1e-5)
    assert cached[1].keys() == whole[1].keys() and len(whole[1]) > 0
    for name in whole[1]:
        torch.testing.assert_close(cached[1][name], whole[1][name], atol=1e-5, rtol=1e-4, msg=name)
    ids[0, 1] = ids[0, 1] % 49 + 1  # a row never seen: the whole model runs
    sequences.answer_logits(model, ids, mask, window, False, bottom)
    assert lowest_ran == [1, 1]


def test_no_frozen_bottom_where_its_output_could_change():
    """Blocks that learn, embeddings that learn, or dropout below the frozen blocks: no cache."""
    from rlhf_toy.stages.common import freeze_bottom

    model = make_tiny_llama(50)
    freeze_bottom(model, 1)
    assert sequences.FrozenBottom.of(model, 1) is not None
    assert sequences.FrozenBottom.of(model, 2) is None  # block 1 learns
    assert sequences.FrozenBottom.of(model, 0) is None
    model.get_input_embeddings().requires_grad_(True)
    assert sequences.FrozenBottom.of(model, 1) is None
    model.get_input_embeddings().requires_grad_(False)
    model.config.attention_dropout = 0.1
    assert sequences.FrozenBottom.of(model, 1) is None
    gpt2 = tiny_gpt2_lm()
    freeze_bottom(gpt2, 1)
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in gpt2.modules())
    assert sequences.FrozenBottom.of(gpt2, 1) is None
