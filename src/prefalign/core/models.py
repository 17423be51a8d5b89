"""Load a causal LM + tokenizer from the `model:` config section: a local path, a hub id, or a registered
source such as `world:reviews` (a world's reference policy, see `core/sources.py`)."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate.utils import extract_model_from_parallel
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefalign.core import sources
from prefalign.core.errors import ConfigError


@dataclass
class LoraSettings:
    enabled: bool = False  # train LoRA adapters (peft) instead of every weight
    r: int = 8  # adapter rank
    alpha: int = 16  # scaling: the update is (alpha / r) * B @ A
    dropout: float = 0.0  # dropout on the adapter input
    target_modules: list[str] | None = None  # None: every linear layer ("all-linear")


@dataclass
class ReferenceSettings:
    """How the reference policy's log-probs are obtained (`core/reference.py`)."""

    strategy: Literal["auto", "precompute", "frozen", "adapter"] = "auto"  # auto = precompute
    cache_dir: str | None = None  # default: <output_dir>/reference_cache


@dataclass
class ModelConfig:
    name_or_path: str = ""  # local dir, hub id, or a registered source (world:reviews, world:reviews-quick)
    tokenizer: str | None = None  # defaults to name_or_path
    revision: str | None = None  # hub branch, tag or commit
    # dtype the weights are loaded in (auto: the checkpoint's); float32 trains anywhere, bfloat16 halves
    # memory on GPUs. With float32 weights, train.mixed_precision bf16 autocasts the forward pass instead
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    trust_remote_code: bool = False  # off unless the user turns it on
    attn_implementation: str | None = None  # e.g. sdpa, flash_attention_2
    lora: LoraSettings = field(default_factory=LoraSettings)
    reference: ReferenceSettings = field(default_factory=ReferenceSettings)


def _dtype(name: str):
    return "auto" if name == "auto" else getattr(torch, name)


def load_tokenizer(cfg: ModelConfig):
    source = cfg.tokenizer or cfg.name_or_path
    if sources.is_source(source):
        return sources.get(source, "causal_lm").load()[1]
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not load tokenizer '{source}': {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token is None:  # GPT-2 style tokenizers have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(cfg: ModelConfig):
    """The model without LoRA (used as policy base and, when needed, as the frozen reference)."""
    if not cfg.name_or_path:
        raise ConfigError(
            "config key 'model.name_or_path' is empty: name a model folder, hub id or world:NAME"
        )
    if sources.is_source(cfg.name_or_path):
        return sources.get(cfg.name_or_path, "causal_lm").load()[0]
    looks_local = cfg.name_or_path.startswith((".", "/", "~")) or Path(cfg.name_or_path).exists()
    if looks_local and not Path(cfg.name_or_path).expanduser().exists():
        raise ConfigError(f"model path not found: {cfg.name_or_path}")
    kwargs = {
        "revision": cfg.revision,
        "dtype": _dtype(cfg.dtype),
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(Path(cfg.name_or_path).expanduser()) if looks_local else cfg.name_or_path, **kwargs
        )
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not load model '{cfg.name_or_path}': {str(e).splitlines()[0]}") from None


def lora_config(lora: LoraSettings):
    """peft's LoraConfig for our settings (every linear layer unless `target_modules` says otherwise)."""
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        task_type="CAUSAL_LM",
        target_modules=lora.target_modules or "all-linear",
    )


def add_lora(model, lora: LoraSettings, adapter_name: str = "default", seed: int = 0):
    """Wrap `model` with fresh LoRA adapters (peft); only adapter weights stay trainable. The adapters start
    from `seed` whatever the process (see `seed_lora`)."""
    model = get_peft_model(model, lora_config(lora), adapter_name=adapter_name)
    seed_lora(model, seed, [adapter_name])
    return model


def seed_lora(model, seed: int, adapters=None) -> None:
    """Draw the LoRA A matrices of `adapters` (default: all) again, each from a generator seeded by (seed,
    module name, adapter): peft draws them from the global RNG in the order of a set of module names, which
    changes from one process to the next, so two identical runs started from different adapters. B stays 0
    (peft's default init: A ~ kaiming-uniform(a=√5), B = 0, so the model is unchanged)."""
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer) or not hasattr(module, "lora_A"):
            continue
        for adapter, layer in module.lora_A.items():
            if adapters is not None and adapter not in adapters:
                continue
            generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}:{adapter}".encode()))
            weight = torch.empty(layer.weight.shape, dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
            with torch.no_grad():
                layer.weight.copy_(weight)


def load_policy(cfg: ModelConfig, seed: int = 0):
    """(policy, tokenizer): the base model, with LoRA adapters (started from `seed`) if `cfg.lora.enabled`."""
    model = load_base_model(cfg)
    tokenizer = load_tokenizer(cfg)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora, seed=seed)
    return model, tokenizer


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with (GPT-2 style tokenizers have no pad token: EOS, masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def save_model(model, tokenizer, path) -> None:
    """`save_pretrained` of the bare model (a LoRA policy saves its adapters) and its tokenizer, safetensors."""
    extract_model_from_parallel(model).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def load_trained(final: Path, cfg: ModelConfig):
    """(policy, tokenizer) saved by `save_model` in `final`: a full model, or `cfg`'s base + the LoRA adapters."""
    final = Path(final)
    if not final.is_dir():
        raise ConfigError(f"{final.parent} has no final/ model (the run did not finish)")
    tokenizer = AutoTokenizer.from_pretrained(final)
    if (final / "adapter_config.json").is_file():
        return PeftModel.from_pretrained(load_base_model(cfg), final), tokenizer
    return AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32), tokenizer
