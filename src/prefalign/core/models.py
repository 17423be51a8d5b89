"""Load a causal LM + tokenizer from the `model:` config section: a local path, a hub id, a LoRA adapter folder
(peft's `adapter_config.json` + weights, on its base model), or a registered source such as `world:reviews` (a
world's reference policy, see `core/sources.py`).

Starting from a trained LoRA adapter (`model.name_or_path` = the adapter folder): with `lora.enabled: true` the
policy is the base with THAT adapter, trainable (training continues it; its own r, alpha and target modules
apply), and the reference is the same model as it was at the start; with `lora.enabled: false` the adapter is
merged into the base (`merge_and_unload`) and the merged model is fine-tuned fully and is the reference.

Dropout: `model.dropout: false` (default) switches every dropout of the model off (nn.Dropout modules and the
attention-dropout rates attention functions read), so policy and reference compute the same function and the
step-1 loss with policy = reference is exactly ln 2; LoRA's own `lora.dropout` is kept. `final/` keeps the
model's original dropout rates in its config."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import weakref
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

logger = logging.getLogger(__name__)


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
    dropout: bool = False  # false: dropout off in policy and reference (see the module docstring)
    lora: LoraSettings = field(default_factory=LoraSettings)
    reference: ReferenceSettings = field(default_factory=ReferenceSettings)


def _dtype(name: str):
    return "auto" if name == "auto" else getattr(torch, name)


def adapter_config(name_or_path: str) -> dict | None:
    """peft's `adapter_config.json` when `name_or_path` is a local LoRA adapter folder, else None."""
    path = Path(name_or_path).expanduser() / "adapter_config.json" if name_or_path else None
    if path is None or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg})") from None
    if not config.get("base_model_name_or_path"):
        raise ConfigError(f"{path}: no base_model_name_or_path: cannot tell which model the adapter is for")
    return config


# files one of which every saved tokenizer has (fast, SentencePiece, BPE, WordPiece)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
    "sentencepiece.bpe.model", "merges.txt",
)  # fmt: skip


def load_tokenizer(cfg: ModelConfig):
    source = cfg.tokenizer or cfg.name_or_path
    if sources.is_source(source):
        return sources.get(source, "causal_lm").load()[1]
    adapter = adapter_config(source)
    if adapter is not None and not (Path(source).expanduser() / "tokenizer_config.json").is_file():
        source = adapter["base_model_name_or_path"]  # an adapter saved without a tokenizer: its base's
    key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
    folder = Path(source).expanduser()
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"config key '{key}': {source} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
            "set model.tokenizer to the folder or hub id of the model's tokenizer"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        first = " ".join(str(e).split())[:300]
        raise ConfigError(
            f"config key '{key}': could not load a tokenizer from '{source}' ({first}); set model.tokenizer to "
            "the folder or hub id of the model's tokenizer"
        ) from None
    if len(tokenizer) < 2 or not tokenizer("a b")["input_ids"]:  # transformers may build an empty one
        raise ConfigError(
            f"config key '{key}': the tokenizer loaded from '{source}' is empty ({len(tokenizer)} tokens); set "
            "model.tokenizer to the folder or hub id of the model's tokenizer"
        )
    if tokenizer.pad_token is None:  # GPT-2 style tokenizers have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _from_pretrained(cfg: ModelConfig, name_or_path: str, revision=None):
    looks_local = name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise ConfigError(f"model path not found: {name_or_path}")
    kwargs = {"revision": revision, "dtype": _dtype(cfg.dtype), "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(Path(name_or_path).expanduser()) if looks_local else name_or_path, **kwargs
        )
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not load model '{name_or_path}': {str(e).splitlines()[0]}") from None


def _load(cfg: ModelConfig, trainable_adapter: bool = False):
    """The model `cfg.model` names. An adapter folder gives its base with the adapter: a trainable PeftModel
    (`trainable_adapter`) or the base with the adapter merged in."""
    if not cfg.name_or_path:
        raise ConfigError(
            "config key 'model.name_or_path' is empty: name a model folder, hub id or world:NAME"
        )
    if sources.is_source(cfg.name_or_path):
        model = sources.get(cfg.name_or_path, "causal_lm").load()[0]
    elif (adapter := adapter_config(cfg.name_or_path)) is not None:
        base = _from_pretrained(cfg, adapter["base_model_name_or_path"], adapter.get("revision"))
        folder = str(Path(cfg.name_or_path).expanduser())
        model = PeftModel.from_pretrained(base, folder, is_trainable=trainable_adapter)
        if not trainable_adapter:  # peft froze the base; the merged model is trained fully
            model = model.merge_and_unload().requires_grad_(True)
    else:
        model = _from_pretrained(cfg, cfg.name_or_path, cfg.revision)
    if not cfg.dropout:
        disable_dropout(model)
    return model


def load_base_model(cfg: ModelConfig):
    """The model the run starts from, without trainable adapters: what the reference is (an adapter folder
    gives its base with the adapter merged in). Dropout is off unless `cfg.dropout`."""
    return _load(cfg)


def load_adapter_base(cfg: ModelConfig):
    """The base model under `cfg.name_or_path`'s adapter (itself when it is no adapter folder): what a trained
    run's `final/` adapter is loaded onto."""
    adapter = adapter_config(cfg.name_or_path)
    if adapter is None:
        return load_base_model(cfg)
    model = _from_pretrained(cfg, adapter["base_model_name_or_path"], adapter.get("revision"))
    if not cfg.dropout:
        disable_dropout(model)
    return model


# ------------------------------------------------------------------------------------------------ dropout

_RATE_NAMES = ("dropout", "pdrop")  # attribute names holding a dropout rate contain one of these


def _is_rate(name: str, value) -> bool:
    return isinstance(value, float) and not isinstance(value, bool) and any(n in name for n in _RATE_NAMES)


def _configs(model):
    """The model's config and the sub-configs inside it (text_config, ...)."""
    config = getattr(model, "config", None)
    todo, seen = [config] if config is not None else [], []
    while todo:
        c = todo.pop()
        if any(c is s for s in seen):
            continue
        seen.append(c)
        todo += [v for v in vars(c).values() if hasattr(v, "to_dict") and hasattr(v, "model_type")]
    return seen


def disable_dropout(model) -> None:
    """Every dropout rate of `model` to 0: nn.Dropout modules, float `*dropout*`/`*pdrop*` attributes of modules
    (attention functions read `module.attention_dropout`) and of its config (some forwards read the config);
    LoRA's `lora_dropout` is left alone. The config's original rates are kept for `save_model`."""
    for name, module in model.named_modules():
        if "lora_dropout" in name:
            continue
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for attr, value in list(vars(module).items()):
            if _is_rate(attr, value):
                setattr(module, attr, 0.0)
    for config in _configs(model):
        rates = {k: v for k, v in vars(config).items() if _is_rate(k, v) and v != 0.0}
        if rates:
            _, before = _ORIGINAL_RATES.get(id(config), (None, {}))
            _ORIGINAL_RATES[id(config)] = (weakref.ref(config), {**before, **rates})
            for key in rates:
                setattr(config, key, 0.0)


_ORIGINAL_RATES: dict[int, tuple] = {}  # id(config) -> (weak reference, the rates disable_dropout zeroed)


def _original_rates(config) -> dict:
    ref, rates = _ORIGINAL_RATES.get(id(config), (None, {}))
    return rates if ref is not None and ref() is config else {}


@contextlib.contextmanager
def original_dropout(model):
    """The config's dropout rates as loaded, while the model is saved."""
    changed = [(c, _original_rates(c)) for c in _configs(model)]
    for config, rates in changed:
        for key, value in rates.items():
            setattr(config, key, value)
    try:
        yield
    finally:
        for config, rates in changed:
            for key in rates:
                setattr(config, key, 0.0)


def lora_config(lora: LoraSettings):
    """peft's LoraConfig for our settings (every linear layer unless `target_modules` says otherwise)."""
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        task_type="CAUSAL_LM",
        target_modules=lora.target_modules or "all-linear",
    )


def check_lora_targets(model, targets: list[str] | None) -> None:
    """Every name in `model.lora.target_modules` matches a module of `model` the way peft matches it (the full
    name, or its last dotted parts): a config error listing the model's layer names otherwise — peft itself
    fails late with a traceback, or, when another name matches, drops the typo silently."""
    if not targets:
        return
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        layers = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and _is_layer(m)}
            - {"lora_A", "lora_B"}
        )
        raise ConfigError(
            f"config key 'model.lora.target_modules': {', '.join(missing)} match{'es' if len(missing) == 1 else ''} "
            f"no module of {type(model).__name__}; its layers are named: {', '.join(layers)} (or leave "
            "target_modules unset for every linear layer)"
        )


def _is_layer(module) -> bool:
    """A module with its own weight matrix and no children (Linear, Conv1D/Conv2d, Embedding...)."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() >= 2 and not list(module.children())


def add_lora(model, lora: LoraSettings, adapter_name: str = "default", seed: int = 0):
    """Wrap `model` with fresh LoRA adapters (peft); only adapter weights stay trainable. The adapters start
    from `seed` whatever the process (see `seed_lora`)."""
    check_lora_targets(model, lora.target_modules)
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
    """(policy, tokenizer): the base model, with LoRA adapters (started from `seed`) if `cfg.lora.enabled`;
    from an adapter folder, that adapter (trainable) or, without LoRA, the base with it merged in."""
    adapter = adapter_config(cfg.name_or_path) if not sources.is_source(cfg.name_or_path) else None
    model = _load(cfg, trainable_adapter=adapter is not None and cfg.lora.enabled)
    tokenizer = load_tokenizer(cfg)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if adapter is not None:
        what = "continues that adapter" if cfg.lora.enabled else "merges it into its base and trains fully"
        logger.warning(
            "model.name_or_path is a LoRA adapter (r=%s on %s): training %s; the reference is that model",
            adapter.get("r"),
            adapter["base_model_name_or_path"],
            what,
        )
    elif cfg.lora.enabled:
        model = add_lora(model, cfg.lora, seed=seed)
    return model, tokenizer


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with (GPT-2 style tokenizers have no pad token: EOS, masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


REFERENCE_ADAPTER = "reference"  # a frozen copy of a trained starting adapter (core.reference)


def save_model(model, tokenizer, path) -> None:
    """`save_pretrained` of the bare model (a LoRA policy saves its adapters, not a frozen reference copy) and
    its tokenizer, safetensors; the config keeps the model's own dropout rates."""
    model = extract_model_from_parallel(model)
    kwargs = {"safe_serialization": True}
    adapters = [a for a in getattr(model, "peft_config", {}) if a != REFERENCE_ADAPTER]
    if adapters:
        kwargs["selected_adapters"] = adapters
    with original_dropout(model):
        model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)


def load_trained(final: Path, cfg: ModelConfig):
    """(policy, tokenizer) saved by `save_model` in `final`: a full model, or `cfg`'s base + the LoRA adapters."""
    final = Path(final)
    if not final.is_dir():
        raise ConfigError(f"{final.parent} has no final/ model (the run did not finish)")
    tokenizer = AutoTokenizer.from_pretrained(final)
    if (final / "adapter_config.json").is_file():
        return PeftModel.from_pretrained(load_adapter_base(cfg), final), tokenizer
    return AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32), tokenizer
