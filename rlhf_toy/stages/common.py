"""What every stage built on an HF/TRL trainer shares: run set-up, LoRA, precision, the final model."""

from __future__ import annotations

import contextlib
import os
from dataclasses import fields
from pathlib import Path

import torch

from rlhf_toy import models, rundir, sequences
from rlhf_toy.config import ConfigError, TrainerFields
from rlhf_toy.evaluation.sample_and_score import Sampling
from rlhf_toy.rundir import is_main_process


def computes_pairs_apart(trainer, model) -> bool:
    """Whether the pairs mixins below may compute `model`'s output their own way: where that is plain, one process (a
    DDP model would see two forwards a step), no gradient checkpointing (it turns the cache off), no LoRA adapter
    (TRL's reference is the adapter turned off around its call), no model whose forward scales or caps its logits
    after the LM head (they run the head apart from the forward)."""
    plain = trainer.accelerator.unwrap_model(model)
    return not (
        trainer.accelerator.num_processes > 1
        or getattr(plain, "is_activation_checkpointing", False)
        or hasattr(plain, "peft_config")
        or any(
            getattr(plain.config, k, None)
            for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")
        )
    )


class DPOAnswerWindows:
    """Mixed into TRL's DPOTrainer by the DPO stage. TRL's DPO loss reads only the logits that predict answer tokens
    (its `completion_mask`), yet it takes their log-softmax, their entropy and their argmax at every position of the
    padded rows, ``[2B, T, vocab]``, and the LM head runs at all of them: over a third of a bf16 step of the demo
    (torch.profiler; docs/performance.md). Here TRL gets each row's answer window instead (`sequences.AnswerWindow`:
    the token before the answer, then the answer, left-aligned), its completion mask, and its logits
    (`sequences.answer_logits`: the head only where a logit predicts an answer token). The log-probs it sums, the
    loss and every metric read the same logits; `attention_mask` stays the rows' own, which TRL counts as
    `num_tokens`. With `share_prompts`, each pair's prompt goes through the trunk once
    (`sequences.forward_sharing_pair_prefixes`). With `frozen_bottom` blocks frozen, the reference pass (the policy
    before training) keeps what they output for every row, and the steps start above them
    (`sequences.FrozenBottom`). TRL's own computation where the window does not apply: no plain model
    (`computes_pairs_apart`), a reference model that would run on the window's ids in the loss (log-probs not
    precomputed), inputs beyond ids and masks, or a row whose answer is not one run."""

    share_prompts = False  # each pair's prompt through the model once (the stage's `share_prompts`)
    frozen_bottom = 0  # the stage's freeze_bottom_layers
    _frozen_bottom_outputs = None  # sequences.FrozenBottom, filled by the reference pass

    def _compute_loss(self, model, inputs, return_outputs):  # the policy
        if self.precompute_ref_logps:
            model, inputs = self.answer_windows(model, inputs)
        return super()._compute_loss(model, inputs, return_outputs)

    def compute_ref_log_probs(self, model, inputs):  # the reference, once before training
        return super().compute_ref_log_probs(*self.answer_windows(model, inputs, reference_pass=True))

    def answer_windows(self, model, inputs: dict, reference_pass: bool = False):
        """(what TRL should call as the model, the inputs it should read): the windows', or its own."""
        from transformers.modeling_outputs import ModelOutput

        pairs_keys = {
            "input_ids",
            "attention_mask",
            "completion_mask",
            "ref_chosen_logps",
            "ref_rejected_logps",
        }
        if set(inputs) - pairs_keys or self.aux_loss_enabled or not computes_pairs_apart(self, model):
            return model, inputs
        window = sequences.AnswerWindow.of(inputs["completion_mask"])
        if window is None:
            return model, inputs
        rows = inputs["input_ids"], inputs["attention_mask"]
        windowed = {**inputs, "input_ids": window.ids(rows[0]), "completion_mask": window.completion_mask()}

        # The reference pass is the policy before training (precomputed log-probs, no LoRA: no reference model),
        # so what its frozen blocks output is what they will output in every step.
        bottom = self._frozen_bottom_outputs
        if reference_pass and bottom is None and self.ref_model is None:
            bottom = self._frozen_bottom_outputs = sequences.FrozenBottom.of(model, self.frozen_bottom)
        recording = reference_pass and bottom is not None

        def answer_logits(**_):  # TRL's call, given the window's ids: the rows go through the model
            # the LM head runs apart from the forward, which accelerate puts under its autocast: under it too
            with (
                self.accelerator.autocast(),
                bottom.recording(*rows) if recording else contextlib.nullcontext(),
            ):
                # recording: each row whole through the blocks (not each pair's prompt once)
                share_prompts = self.share_prompts and not recording
                logits = sequences.answer_logits(
                    model, *rows, window, share_prompts, None if reference_pass else bottom
                )
                return ModelOutput(logits=logits)

        return answer_logits, windowed


class RewardPromptsOnce:
    """Mixed into TRL's RewardTrainer by the reward stage with `share_prompts`: the model its loss calls on a batch of
    pairs (chosen rows, then rejected) puts each pair's prompt through the model once
    (`sequences.forward_sharing_pair_prefixes`), where TRL runs it in both rows; the same scores and gradients."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if computes_pairs_apart(self, model):
            model = PairsCalling(model)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class PairsCalling:
    """`model`, called as TRL calls it on a batch of pairs, computed by `forward_sharing_pair_prefixes`."""

    def __init__(self, model):
        self.model = model

    def __call__(self, input_ids, attention_mask, use_cache=None, **others):
        if others:  # anything else (a margin, router logits): TRL's own call
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache, **others
            )
        return sequences.forward_sharing_pair_prefixes(self.model, input_ids, attention_mask)


def wait_for_everyone(cfg) -> None:
    """A barrier across launched processes (a no-op alone). It starts accelerate's process group with the
    same device choice the TRL trainers will make (`trainer_precision`), so they find it ready."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState(cpu=trainer_precision(cfg)["use_cpu"]).wait_for_everyone()


def shared_dataset(records: list[dict], directory: Path, cfg):
    """`records` as a `datasets.Dataset`; under several processes a file-backed one under `directory`,
    written by rank 0 and read by every process: TRL caches derived columns (DPO's precomputed reference
    log-probs) next to the dataset's files, and an in-memory dataset's cache would live in a temporary
    directory of each process's own, where the others cannot find it."""
    from datasets import Dataset, load_from_disk

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dataset.from_list(records)
    if is_main_process():
        Dataset.from_list(records).save_to_disk(str(directory))
    wait_for_everyone(cfg)
    return load_from_disk(str(directory))


def open_run(cfg):
    """The run-directory rule (`rundir.prepare_run_dir`: decided before anything is written, its verdict
    printed), then seeds and threads. Returns the `RunStart`; a finished run has nothing left to do."""

    start = rundir.prepare_run_dir(cfg)
    if start.message:
        print(start.message)
    if not start.finished:
        setup_run(cfg)
    return start


def begin_run(start, cfg) -> None:
    """The stage's first write, once its config and inputs are valid; one process of a group writes."""
    if is_main_process():
        start.begin(cfg)


def setup_run(cfg) -> Path:
    """Seed and threads (shared by every stage). The run directory is `rundir`'s: nothing is written here."""
    from transformers import set_seed

    set_seed(cfg.seed)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    return Path(cfg.output_dir)


def train(trainer, start):
    """`trainer.train()`, continuing from the run's checkpoint (`rundir.RunStart`). A checkpoint that
    already holds the run's last step (killed after training, before the end) is loaded, not trained
    from: HF would run one step past max_steps when that step ends mid-epoch. Returns the train output,
    or None when nothing was trained."""
    from transformers import TrainerState

    if start.checkpoint is not None and start.action == "resume":
        state = TrainerState.load_from_json(str(start.checkpoint / "trainer_state.json"))
        if state.max_steps and state.global_step >= state.max_steps:
            trainer._load_from_checkpoint(str(start.checkpoint))
            trainer.state = state
            return None
    return trainer.train(resume_from_checkpoint=str(start.checkpoint) if start.checkpoint else None)


def evaluate_before_training(trainer) -> dict | None:
    """`trainer.evaluate()` before `trainer.train()`, with data parallelism intact: the metrics, or None under
    FSDP and DeepSpeed (the HF Trainer cannot evaluate a model it has not prepared with its optimizer). Evaluating
    marks the model prepared, and `train()` would then never wrap it in DDP; the mark is undone here under several
    processes (docs/scaling_out.md, "A bug this found"; tests/test_multiprocess.py holds 2 processes to 1)."""
    from accelerate.utils import DistributedType

    if trainer.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return None
    metrics = trainer.evaluate()
    model = trainer.model
    if trainer.accelerator.num_processes > 1 and trainer.model_wrapped is model:
        model.__dict__.pop("_is_accelerate_prepared", None)
        trainer.accelerator._models[:] = [m for m in trainer.accelerator._models if m is not model]
    return metrics


def trainer_fields(cfg, *, evaluate: bool) -> dict:
    """The TrainingArguments fields every stage sets alike: the config's TrainerFields (eval batch = train
    batch), logging, checkpoints every `save_steps`, held-out loss every `eval_steps` when `evaluate`, the
    seed, a progress bar, and the device and precision (`trainer_precision`)."""
    values = {f.name: getattr(cfg, f.name) for f in fields(TrainerFields)}
    return {
        **values,
        "per_device_eval_batch_size": cfg.per_device_train_batch_size,
        "logging_steps": cfg.logging_steps,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "save_total_limit": cfg.save_total_limit,
        "eval_strategy": "steps" if cfg.eval_steps and evaluate else "no",
        "eval_steps": cfg.eval_steps or None,
        "report_to": "none",  # our MetricsCallback writes metrics.jsonl and TensorBoard
        "seed": cfg.seed,
        "disable_tqdm": False,
        "dataloader_num_workers": 0,
        **trainer_precision(cfg),
    }


def eval_sampling(cfg, precision: models.Precision, *, seed: int | None = None) -> Sampling:
    """How a stage samples its eval prompts: the config's max_new_tokens, temperature, sample_batch_size
    and seed (or `seed`)."""
    return Sampling(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        batch_size=cfg.sample_batch_size,
        seed=cfg.seed if seed is None else seed,
        precision=precision,
    )


def lora_config(cfg, task_type: str = "CAUSAL_LM", **extra):
    """peft's LoraConfig from the stage config's LoraFields (None without `use_lora`)."""
    if not cfg.use_lora:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        task_type=task_type,
        **extra,
    )


def resolve_run_precision(cfg) -> models.Precision:
    """The run's precision; `cfg.dtype` becomes its name in place (`auto` -> `bfloat16-mixed` or `float32`),
    so the run's config.yaml records what ran and a resume on a machine that resolves differently is refused.
    Every stage calls it first, before `open_run` applies the run-directory rule to the resolved config; the
    launch config's engine is checked here too (`check_engine`)."""
    device = models.pick_device(cfg.device)
    check_engine(device, cfg.use_lora)
    precision = models.resolve_precision(cfg.dtype, device)
    cfg.dtype = precision.name
    return precision


def check_engine(device: torch.device, use_lora: bool = False) -> None:
    """Refuse a launch config (configs/accelerate/) whose engine cannot run here, before anything loads. accelerate
    1.15 picks FSDP and DeepSpeed only for GPUs: on the CPU it silently drops them and runs plain DDP, which would
    be a run that does not do what its config says. LoRA under an engine that shards the weights is refused too:
    merging the adapter into `final/` (and PPO's reference, the policy with its adapter off) needs whole weights,
    and on sharded ones SFT hung after training without writing `final/` (2 CPU processes under FSDP2)."""

    requested = [
        name
        for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
        if os.environ.get(variable, "false").lower() == "true"
    ]
    if not requested:
        return
    engine = requested[0]
    sharded = engine == "FSDP" or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    if use_lora and sharded:
        raise ConfigError(
            f"use_lora under {'FSDP' if engine == 'FSDP' else 'DeepSpeed ZeRO-3'}, which shards the "
            "weights: merging the adapter needs them whole; LoRA trains few weights, so use "
            "configs/accelerate/ddp.yaml or zero2.yaml"
        )
    if device.type == "cpu":
        raise ConfigError(
            f"the launch config asks for {engine}, which accelerate runs on GPUs only (on the CPU it "
            "ignores it and runs plain DDP): use configs/accelerate/ddp.yaml here, or `accelerate launch "
            "--multi_gpu --num_processes N`"
        )
    if engine == "DeepSpeed":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(
                "the launch config asks for DeepSpeed, which is not installed: `pip install deepspeed` "
                "(not a dependency of rlhf_toy; it needs a CUDA GPU and builds its kernels on first use)"
            )


def trainer_precision(cfg) -> dict:
    """TrainingArguments fields for the device and precision the config resolves to. HF's `bf16=True` is
    autocast: with float32 weights (bfloat16-mixed) the Trainer keeps float32 master weights and AdamW
    state, as our PPO does; with bf16 weights (pure bfloat16) everything is bf16."""
    device = models.pick_device(cfg.device)
    compute = models.resolve_precision(cfg.dtype, device).compute
    return {
        "use_cpu": device.type == "cpu",
        "bf16": compute == torch.bfloat16,
        "fp16": compute == torch.float16,
    }


def save_final(trainer, tokenizer, run_dir: Path) -> Path:
    """final/: a plain HF model (LoRA merged in) that any from_pretrained loads, written by rank 0 once
    every process has finished training; no process goes on before it is complete. Under FSDP and ZeRO-3, whose
    processes each hold a shard of the weights, every process first takes part in gathering them whole."""
    final = run_dir / "final"
    trainer.accelerator.wait_for_everyone()
    whole = gathered_state_dict(trainer.accelerator, trainer.model_wrapped)
    if is_main_process():
        model = trainer.accelerator.unwrap_model(trainer.model)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        models.save_model(model, final, whole)
        tokenizer.save_pretrained(final)
    trainer.accelerator.wait_for_everyone()
    return final


def gathered_state_dict(accelerator, model) -> dict | None:
    """The prepared `model`'s whole weights, gathered onto rank 0 (the others get an empty dict), where the engine
    shards them (FSDP, ZeRO-3: a collective, every process calls it); None elsewhere: the model's own state dict
    is whole already (`models.save_model` saves it)."""
    return accelerator.get_state_dict(model) if shards_weights(accelerator) else None


def shards_weights(accelerator) -> bool:
    """Whether the engine splits the weights themselves across processes (FSDP, DeepSpeed ZeRO-3)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP or (
        accelerator.distributed_type == DistributedType.DEEPSPEED
        and accelerator.state.deepspeed_plugin.zero_stage == 3
    )


def freeze_bottom(model, n_layers: int) -> None:
    """Freeze the input embeddings and the `n_layers` lowest transformer blocks: backward then stops
    early (it is most of a step's time on a CPU) and AdamW updates fewer weights; the upper blocks and the
    head still learn (with tied embeddings, as SmolLM2's, the LM head is frozen too). Every stage offers
    it (`freeze_bottom_layers`); the demo's reward model, PPO and DPO use it to fit the CPU budget."""
    if n_layers <= 0:
        return
    n_blocks = model.config.num_hidden_layers
    blocks = models.transformer_blocks(model)
    if blocks is None or n_layers > n_blocks:
        raise ConfigError(f"freeze_bottom_layers={n_layers}: the model has {n_blocks} blocks")
    for module in [*models.embeddings_below_blocks(model), *blocks[:n_layers]]:
        module.requires_grad_(False)
