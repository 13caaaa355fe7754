"""The PPO stage's models: the policy, its frozen reference, the critic, and their forward passes."""

from __future__ import annotations

import torch

from rlhf_toy import models, sequences
from rlhf_toy.stages.common import freeze_bottom, lora_config


def forward_values(value_model, input_ids, attention_mask, context_length: int):
    """Per-token values V(s_t) for the state before each response token: the reward model's scalar
    head applied to every position's hidden state (TRL's get_reward), not only the last one."""
    # Through PEFT, getattr(peft_model, "model") is Llama's whole seq-cls model, not its backbone:
    # go through the base model (whose LoRA layers and trainable score copy are still in place).
    base = value_model.get_base_model() if hasattr(value_model, "get_base_model") else value_model
    backbone = getattr(base, base.base_model_prefix)
    hidden = backbone(**sequences.model_inputs(input_ids, attention_mask)).last_hidden_state
    return base.score(hidden).squeeze(-1)[:, context_length - 1 : -1].float()


def load_models(cfg, tokenizer, device, dtype):
    """Policy (optionally LoRA), reference (a frozen copy, or with LoRA the policy with its adapter
    disabled), critic (a value model, with `critic: shared` a Linear(hidden, 1) value head on the
    policy's trunk, or None with `critic: none`: the critic-free estimators load and train no value model)."""
    from transformers import AutoModelForSequenceClassification

    policy_path = models.resolve_model_path(cfg.model_name_or_path)
    policy = models.causal_lm_from(policy_path, dtype, tokenizer)
    freeze_bottom(policy, cfg.freeze_bottom_layers)  # the reference stays a full frozen copy
    if cfg.critic == "none":
        value_model = None
    elif cfg.critic == "shared":
        # Zero-initialised: V = 0 everywhere at first, so the first advantages are the plain returns
        # rather than a random head's noise; the value loss teaches it from the first update.
        value_model = torch.nn.Linear(policy.config.hidden_size, 1, dtype=dtype)
        torch.nn.init.zeros_(value_model.weight)
        torch.nn.init.zeros_(value_model.bias)
    else:
        value_model = AutoModelForSequenceClassification.from_pretrained(
            models.resolve_model_path(cfg.reward_model_path), num_labels=1, dtype=dtype
        )
        value_model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.use_lora:
        # With LoRA the reference is the same weights with the adapter disabled: no second copy.
        from peft import get_peft_model

        policy = get_peft_model(policy, lora_config(cfg))
        reference = AdapterDisabled(policy)
        if cfg.critic == "separate":
            # the value head itself trains in full
            value_model = get_peft_model(value_model, lora_config(cfg, "SEQ_CLS", modules_to_save=["score"]))
    else:
        reference = models.causal_lm_from(policy_path, dtype, tokenizer)
        reference.requires_grad_(False)
        reference.eval().to(device)
    for model in (policy, value_model):
        if model is not None:
            disable_dropout(model)
            model.to(device)
    return policy, reference, value_model


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere, so the update's log-probs and values match the rollout's (TRL,
    lm-human-preferences). Not only `nn.Dropout` modules: Llama-style attention reads a plain float
    (`attention_dropout`, from the config) at every call, which zeroing modules never reaches."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
        config = getattr(module, "config", None)
        for key, value in list(vars(config).items()) if config is not None else ():
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                setattr(config, key, 0.0)


class AdapterDisabled:
    """The LoRA policy with its adapter switched off: the reference, without a second copy of the weights.
    Called like a model (only for forward passes, as `sequences.response_logprobs` does)."""

    def __init__(self, peft_model):
        self.model = peft_model

    def parameters(self):
        return self.model.parameters()

    def __call__(self, **inputs):
        with self.model.disable_adapter():
            return self.model(**inputs)


def assert_in_sync(parameters, accelerator) -> None:
    """Data parallelism is only correct while every process holds the same weights: check a checksum."""
    if accelerator.num_processes == 1:
        return
    checksum = torch.stack([p.detach().double().sum() for p in parameters]).sum().reshape(1)
    gathered = accelerator.gather(checksum)
    if not torch.allclose(gathered, gathered[0].expand_as(gathered), rtol=1e-6):
        raise RuntimeError(f"processes' weights diverged (checksums {gathered.tolist()})")
