"""`sequences.forward_sharing_pair_prefixes`: DPO's and the reward model's pairs put each prompt through the model once,
for the same logits, scores and gradients as one forward of the padded rows."""

import pytest
import torch
from conftest import ROOT, make_tiny_llama
from transformers import LlamaForSequenceClassification

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

    plain = loss_and_grads(lambda: model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False))
    shared = loss_and_grads(lambda: sequences.forward_sharing_pair_prefixes(model, input_ids, attention_mask))
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
        "logps/chosen",
        "logps/rejected",
        "accuracy",
        "margin",
    )
    rows = runlog.read_jsonl(out / "metrics.jsonl")
    return [{k: r[k] for k in keys if k in r} for r in rows if "loss" in r]


@pytest.mark.parametrize("stage", ["dpo", "reward"])
def test_the_stages_train_as_they_would_with_each_row_whole(stage, pipeline, tmp_path, monkeypatch):
    """TRL's DPOTrainer and RewardTrainer, mixed with PromptsOnce (`share_prompts`: true, or auto in float32): every
    pairs forward shares the prompts (the DPO reference's too), and training logs the losses and metrics it logs with
    TRL's forward of the padded rows (`--share_prompts false`)."""
    from rlhf_toy.config import parse_config
    from rlhf_toy.stages.dpo import DPOStageConfig, run_dpo
    from rlhf_toy.stages.reward import RewardStageConfig, train_reward

    def run(out, share_prompts: bool):
        flags = {"model_name_or_path": pipeline / "sft/final", "dataset": pipeline / "pairs.jsonl"}
        flags.update(
            num_eval_prompts=0, max_steps=3, share_prompts=str(share_prompts).lower(), output_dir=out
        )
        if stage == "dpo":
            flags.update(config=ROOT / "configs/tiny/dpo.yaml", reward_model="none")
            config_class, train = DPOStageConfig, run_dpo
        else:
            flags.update(config=ROOT / "configs/tiny/reward.yaml", policy_model=pipeline / "sft/final")
            flags.update(train_prompts=pipeline / "prompts.jsonl", eval_prompts=pipeline / "prompts.jsonl")
            config_class, train = RewardStageConfig, train_reward
        train(parse_config(config_class, [str(x) for k, v in flags.items() for x in (f"--{k}", v)]))
        return stage_metrics(out)

    calls = []
    shared_forward = sequences.forward_sharing_pair_prefixes
    monkeypatch.setattr(
        sequences,
        "forward_sharing_pair_prefixes",
        lambda *a: calls.append(a[3] is not None) or shared_forward(*a),
    )
    shared = run(tmp_path / "shared", True)
    steps = (
        3 if stage == "reward" else 3 + 1
    )  # DPO's reference pass adds its batches: 1 of them here at least
    assert len(calls) >= steps and len(shared) == 3
    assert set(calls) == {stage == "dpo"}  # DPO's logits: the head only where they predict an answer token
    calls.clear()
    whole = run(tmp_path / "whole", False)
    assert calls == [] and len(whole) == 3
    for a, b in zip(shared, whole):
        assert a.keys() == b.keys() and len(a) >= 3
        assert a == pytest.approx(b, abs=1e-4, rel=1e-4)


@pytest.mark.parametrize("make_model", [tiny_gpt2_lm, lambda: make_tiny_llama(50)], ids=["gpt2", "llama"])
def test_the_lm_head_runs_only_where_its_logits_are_read(make_model, monkeypatch):
    """DPO reads the logits that predict answer tokens: given them, the head runs there (its input has that many
    rows), those logits and the gradients of what reads them are a whole forward's, and the rest are 0."""
    model = make_model().train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    input_ids, attention_mask = pairs_batch(50)
    needed = attention_mask.bool() & (torch.arange(input_ids.shape[1]) >= 5)  # past a 6-token "prompt"
    needed[:, -1] = False
    needed &= torch.roll(attention_mask.bool(), -1, 1)  # a logit predicts the next token, a real one
    head_rows = []
    model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: head_rows.append(args[0].shape[0])
    )

    def read(forward):
        model.zero_grad(set_to_none=True)
        logits = forward().logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        (logp * needed[:, :-1]).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = read(lambda: model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False))
    head_rows.clear()
    shared = read(lambda: sequences.forward_sharing_pair_prefixes(model, input_ids, attention_mask, needed))
    assert head_rows[-1] == int(needed.sum())
    torch.testing.assert_close(shared[0][needed], plain[0][needed], atol=1e-5, rtol=1e-5)
    assert (shared[0][~needed] == 0).all()
    for name in plain[1]:
        torch.testing.assert_close(shared[1][name], plain[1][name], atol=1e-5, rtol=1e-4, msg=name)


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
