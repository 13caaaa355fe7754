"""The scores every stage and every evaluation share, from one implementation each:

- `encode_for_reward`: the one place where (prompt, response) becomes reward-model input ids: the prompt
  exactly as the policy sees it (`sequences.prompt_text`), then the response tokens, then EOS. The model
  scores the last token, so every sequence ends in the same token whether or not the policy stopped on its
  own (a missing EOS is penalised separately, in `sequence_score`). Reward training pre-tokenizes its pairs
  with it, so training sees exactly what `RewardScorer` sees.
- `RewardScorer`: a trained reward model with its normalisation (gain and bias such that SFT samples score
  mean 0, std 1; lm-human-preferences), stored beside the weights in `reward_normalization.json`.
- `sequence_score`: the score PPO optimises, RM minus its length and missing-EOS penalties.
- `Judge`: gold (the simulated human, `task.gold_parts`) always, and the RM score and PPO's penalised score
  when a reward model is given.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlhf_toy import data, models, sequences, task
from rlhf_toy.config import ConfigError

NORMALIZATION_FILE = "reward_normalization.json"


class RewardNormalizationMissing(models.ModelNotFoundError):
    """A reward model directory without its gain and bias (so a CLI prints one line, not a traceback)."""


# --------------------------------------------------------------------------------------------------
# Formatting: the one place where (prompt, response) becomes reward-model input ids.


def response_text(value, where: str = "response") -> str:
    """A response in TRL's plain (str) or conversational ([{"role": "assistant", ...}]) form, as text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and "content" in value[0]:
        return value[0]["content"]
    raise data.DataError(f"{where}: expected a string or one assistant message, got {str(value)[:80]!r}")


def encode_for_reward(tokenizer, prompt, response: str, max_length: int) -> tuple[list[int], bool]:
    """Reward-model input ids for one (prompt, response), and whether the prompt was truncated.

    The response is stripped of surrounding whitespace (every consumer scores the same text: PPO's
    decoded tokens, the stripped samples of calibration and evaluation, the data's answers), tokenized on
    its own (as the policy generated it, after the prompt) and always ends in EOS. When the whole does
    not fit, the prompt loses its beginning, never the response."""
    response = response.strip()
    prompt_ids = tokenizer(
        sequences.prompt_text(tokenizer, data.as_messages(prompt, "user")), add_special_tokens=False
    )["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] if response else []
    response_ids = response_ids + [tokenizer.eos_token_id]
    room = max_length - len(response_ids)
    if room < 0:
        raise ValueError(
            f"a response of {len(response_ids)} tokens (EOS included) does not fit max_length="
            f"{max_length}; responses are never truncated, so raise max_length"
        )
    truncated = len(prompt_ids) > room
    return (prompt_ids[len(prompt_ids) - room :] if room else []) + response_ids, truncated


def pad_right(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding, as TRL's preference collator pads during training: positions then start at 0
    for every sequence, and the model's score sits on the last non-pad token (the EOS)."""
    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad_token_id] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    return ids, mask


# --------------------------------------------------------------------------------------------------
# The scorer every consumer uses.


def read_normalization(path) -> dict:
    path = Path(path)
    file = path / NORMALIZATION_FILE
    if not file.exists():
        raise RewardNormalizationMissing(
            f"{path} has no {NORMALIZATION_FILE} (the gain and bias that normalise the reward model's scores). "
            f"`python scripts/train_reward.py --config configs/reward.yaml` writes it after training; for an "
            f"existing reward model run `python -m rlhf_toy.stages.reward normalize {path} --policy runs/sft/final`."
        )
    return json.loads(file.read_text())


def reward_model_dir(path) -> Path:
    """Accept a run directory for its final/ model."""
    path = Path(path)
    if not (path / "config.json").exists() and (path / "final" / "config.json").exists():
        return path / "final"
    return Path(models.resolve_model_path(str(path)))


def load_reward_model(path, device: str = "auto", dtype: str = "auto", num_hidden_layers: int = 0):
    """An `AutoModelForSequenceClassification(num_labels=1)` from a reward model or a causal LM directory
    (a causal LM gets a fresh score head). `num_hidden_layers` keeps only that many of the lowest blocks."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    torch_device = models.pick_device(device)
    resolved = models.resolve_model_path(str(path))
    if models.is_adapter_dir(resolved):
        raise models.ModelNotFoundError(
            f"{path} is a LoRA adapter; a reward model (and its init) is a full model directory, such as a "
            "run's final/ (where every stage saves its LoRA run merged)"
        )
    overrides = {"num_labels": 1}
    if num_hidden_layers:
        n_blocks = AutoConfig.from_pretrained(resolved).num_hidden_layers
        if num_hidden_layers > n_blocks:
            raise ConfigError(f"num_hidden_layers={num_hidden_layers}: {path} has only {n_blocks} blocks")
        overrides["num_hidden_layers"] = num_hidden_layers
    # From a causal LM, "score.weight missing" and "lm_head unexpected" are the expected cross-architecture
    # report (as are the dropped upper blocks): silence it rather than alarm the user.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolved, dtype=models.resolve_precision(dtype, torch_device).weights, **overrides
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.to(torch_device)


class RewardScorer:
    """Loads a trained reward model and scores (prompt, response) batches: normalised, float32, on the CPU.

    `score` applies the stored gain and bias; `score_raw` is the model's output before them. An input is at
    most `max_length` tokens and never more than the model has positions for; `n_truncated` counts prompts
    (over this scorer's lifetime) that lost their beginning to fit."""

    def __init__(
        self,
        path: str,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 16,
        max_length: int = 512,
        *,
        require_normalization: bool = True,
    ):
        self.path = reward_model_dir(path)
        models.check_kind(str(self.path), models.REWARD_MODEL)  # before the normalisation's own complaint
        # Only calibration itself scores without a normalisation (it is what creates one).
        self.normalization = (
            read_normalization(self.path)
            if require_normalization or (self.path / NORMALIZATION_FILE).exists()
            else {"gain": 1.0, "bias": 0.0}
        )
        self.gain = float(self.normalization["gain"])
        self.bias = float(self.normalization["bias"])
        self.tokenizer = models.load_tokenizer(str(self.path))
        self.model = load_reward_model(self.path, device, dtype).eval()
        self.precision = models.resolve_precision(dtype, self.model.device)
        if self.model.config.num_labels != 1:
            raise models.ModelNotFoundError(
                f"{self.path} is not a reward model (num_labels={self.model.config.num_labels}, expected 1)"
            )
        models.align_with_tokenizer(self.model, self.tokenizer)
        self.device = next(self.model.parameters()).device
        self.batch_size = batch_size
        config = self.model.config
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.max_length = min(max_length, positions) if positions else max_length
        self.n_truncated = 0

    @torch.no_grad()
    def score_raw(self, prompts, responses) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return torch.zeros(0)
        encoded = [
            encode_for_reward(self.tokenizer, p, r, self.max_length) for p, r in zip(prompts, responses)
        ]
        self.n_truncated += sum(truncated for _, truncated in encoded)
        # Batch similar lengths together (less padding), then restore the caller's order.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        scores = torch.empty(len(encoded), dtype=torch.float32)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            ids, mask = pad_right([encoded[i][0] for i in index], self.tokenizer.pad_token_id)
            with self.precision.autocast():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            scores[index] = logits[:, 0].float().cpu()
        return scores

    def score(self, prompts, responses) -> torch.Tensor:
        return self.score_raw(prompts, responses) * self.gain + self.bias


def sequence_score(
    rm_norm: torch.Tensor,
    n_tokens: torch.Tensor,
    has_eos: torch.Tensor,
    *,
    length_coef: float,
    length_target: int,
    missing_eos_penalty: float,
    overlong_buffer: int = 0,
    overlong_penalty: float = 0.0,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """The score PPO optimises, with its parts (so each can be logged):

        score = rm_norm − length_coef·max(0, n_tokens − length_target) − missing_eos_penalty·[no EOS]
                − overlong_penalty·clip((n_tokens − (max_length − overlong_buffer)) / overlong_buffer, 0, 1)

    the last term DAPO's soft overlong punishment (Yu et al. 2025, eq. 13: a linear ramp over the last
    `overlong_buffer` tokens before the limit; 0 when `overlong_buffer` is 0). `length_penalty`, `eos_penalty`
    and `overlong_penalty` are returned as the (non-negative) amounts subtracted."""
    rm = rm_norm.float()
    n = n_tokens.to(rm.device).float()
    length_penalty = length_coef * (n - length_target).clamp(min=0)
    eos_penalty = missing_eos_penalty * (~has_eos.to(rm.device).bool()).float()
    parts = {
        "score": rm - length_penalty - eos_penalty,
        "rm": rm,
        "length_penalty": length_penalty,
        "eos_penalty": eos_penalty,
    }
    if overlong_buffer:
        if max_length is None:
            raise ValueError(
                "sequence_score: the overlong penalty needs max_length (the response-length limit)"
            )
        ramp = ((n - (max_length - overlong_buffer)) / overlong_buffer).clamp(0, 1)
        parts["overlong_penalty"] = overlong_penalty * ramp
        parts["score"] = parts["score"] - parts["overlong_penalty"]
    return parts


# The penalties of `sequence_score` when a run has none (every stage but PPO).
PENALTIES_OFF = {"length_coef": 0.0, "length_target": 0, "missing_eos_penalty": 0.0}


def run_penalties(run_dir) -> dict | None:
    """The length and missing-EOS penalties a run was trained with, read from its resolved
    `config.yaml` (the PPO stage's fields of the same names), or None for a run without them."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    config = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    if not all(name in config for name in PENALTIES_OFF):
        return None
    return {name: type(default)(config[name]) for name, default in PENALTIES_OFF.items()}


def has_reward_model(path) -> bool:
    """Whether `path` holds a model to score with: a model directory, or a run directory's final/."""
    path = Path(path)
    return (path / "config.json").exists() or (path / "final" / "config.json").exists()


class Judge:
    """Gold always; the reward model (and PPO's length/EOS penalties) when one is given and exists.
    `reward_model`: a reward model directory, an already loaded `RewardScorer`, or None."""

    def __init__(
        self,
        reward_model: str | RewardScorer | None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        length_coef: float = 0.0,
        length_target: int = 0,
        missing_eos_penalty: float = 0.0,
    ):
        self.penalties = {
            "length_coef": length_coef,
            "length_target": length_target,
            "missing_eos_penalty": missing_eos_penalty,
        }
        self.scorer, self.note, self.path = None, None, None
        if isinstance(reward_model, RewardScorer):
            self.scorer, self.path = reward_model, str(reward_model.path)
            return
        if not reward_model or reward_model == "none":
            self.note = "no reward model given: rm_mean and score_mean are null"
            return
        path = Path(reward_model)
        if not has_reward_model(path):
            self.note = (
                f"no reward model at {reward_model} (train one with scripts/train_reward.py): "
                "rm_mean and score_mean are null"
            )
            return
        self.scorer = RewardScorer(str(path), device=device, dtype=dtype)
        self.path = str(path)

    def score(self, prompts, responses, n_tokens, has_eos, *, titles=None) -> list[dict]:
        rows = []
        for response, title in zip(responses, titles or [None] * len(responses)):
            parts = task.gold_parts(response, title)
            rows.append(
                {"gold": parts["gold"], "gold_parts": {k: v for k, v in parts.items() if k != "gold"}}
            )
        if self.scorer is None:
            for row in rows:
                row.update(rm=None, score=None, length_penalty=None, eos_penalty=None)
            return rows
        rm = self.scorer.score(prompts, responses).float().cpu()
        scored = sequence_score(rm, torch.tensor(n_tokens), torch.tensor(has_eos), **self.penalties)
        for i, row in enumerate(rows):
            for name in ("score", "rm", "length_penalty", "eos_penalty"):
                value = scored[name]
                row[name] = float(value[i] if torch.is_tensor(value) and value.dim() else value)
        return rows
