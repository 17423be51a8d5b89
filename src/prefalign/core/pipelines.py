"""Diffusion models in and out: Stable Diffusion pipelines (SD-1.x/2.x, SDXL) and bare UNet folders.

`load_parts(model)` reads `model.name_or_path`:
- a diffusers pipeline (a folder with `model_index.json`, or a hub id): `StableDiffusionPipeline` or
  `StableDiffusionXLPipeline`, loaded by that class's own `from_pretrained` (UNet, VAE, text encoder(s),
  tokenizer(s)); training noise comes from a `DDPMScheduler` built from the pipeline's scheduler config,
  as the reference training scripts do;
- a folder with `unet/` and `scheduler/` only (a class-conditional or embedding-conditioned UNet);
- a registered source (`world:digits`, `world:digits-text`), whose loader returns `DiffusionParts` (or the
  older `(unet, scheduler)` pair).

The trained UNet goes out in the form diffusers reads back: LoRA adapters as
`final/pytorch_lora_weights.safetensors` (the pipeline class's `save_lora_weights`, with the adapter's
rank and alpha as metadata, so `pipeline.load_lora_weights(run/final)` rebuilds the trained network
exactly), a fully fine-tuned UNet as `final/unet/` (`UNet2DConditionModel.from_pretrained`). A bare-UNet
base keeps its layout: `final/unet/` (LoRA merged in) + `final/scheduler/`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from prefalign.core import sources
from prefalign.core.errors import ConfigError
from prefalign.core.models import LoraSettings, check_lora_targets, seed_lora

PIPELINES = {
    "StableDiffusionPipeline": StableDiffusionPipeline,
    "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
}
UNET_LORA_TARGETS = ["conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0"]
LORA_FILE = "pytorch_lora_weights.safetensors"


# ---------------------------------------------------------------- the `model:` section


@dataclass
class DiffusionReference:
    strategy: Literal["auto", "frozen", "adapter"] = "auto"  # auto: adapter with LoRA, else a frozen copy


@dataclass
class DiffusionModelConfig:
    """`model:` of the diffusion methods: the pipeline (or UNet) whose UNet is aligned (full or LoRA)."""

    # a diffusers pipeline folder or hub id (SD-1.x/2.x, SDXL), a folder with unet/ + scheduler/, or world:NAME
    name_or_path: str = ""
    revision: str | None = None  # hub revision
    variant: str | None = None  # weight files variant, e.g. fp16 (loaded, then computed in float32)
    vae: str | None = None  # another VAE (folder or hub id), e.g. madebyollin/sdxl-vae-fp16-fix
    gradient_checkpointing: bool = False  # recompute UNet activations in backward: less memory, slower
    lora: LoraSettings = field(default_factory=LoraSettings)  # target_modules default: UNET_LORA_TARGETS
    reference: DiffusionReference = field(default_factory=DiffusionReference)

    def validate(self):
        if self.reference.strategy == "adapter" and not self.lora.enabled:
            raise ConfigError(
                "config key 'model.reference.strategy': 'adapter' needs model.lora.enabled: true"
            )


# keys of older diffusion configs -> their place now
MODEL_RENAMES = {
    "model.base": lambda v: {"model.name_or_path": f"world:{v}" if v in ("digits", "digits-quick") else v},
    "model.lora_rank": lambda v: {"model.lora.enabled": int(v) > 0, "model.lora.r": max(int(v), 1)},
    "model.lora_alpha": "model.lora.alpha",
    "model.lora_targets": "model.lora.target_modules",
    "reference": lambda v: {"model.reference.strategy": {"lora_disabled": "adapter"}.get(v, v)},
    "beta": "loss.beta",
    "data.path": "data.train",
    "data.source": lambda v: {} if v == "file" else {"data.train": "world:digits-judge"},
    "data.world_seed": lambda v: {},
    "eval_samples_per_class": "data.eval_samples_per_class",
}


# ---------------------------------------------------------------- the parts of a model


@dataclass
class DiffusionParts:
    """A UNet to train and what it needs around it. `vae` None: the UNet works on pixels in [-1, 1];
    `text_encoders`/`tokenizers` empty: the condition is class labels or embeddings given with the data."""

    unet: Any
    scheduler: Any  # the training noise schedule (DDPMScheduler)
    vae: Any = None
    text_encoders: list = field(default_factory=list)
    tokenizers: list = field(default_factory=list)
    pipeline_class: str | None = None  # a key of PIPELINES when the parts came from a pipeline
    pipeline_config: dict = field(default_factory=dict)  # e.g. SDXL's force_zeros_for_empty_prompt

    @property
    def conditioning(self) -> str:
        """ "sdxl" (two encoders, pooled embeddings, time ids), "text" (captions), "class" (integer labels)
        or "embedding" (float embeddings given with the data)."""
        if self.text_encoders:
            return "sdxl" if self.pipeline_class == "StableDiffusionXLPipeline" else "text"
        config = self.unet.config
        if isinstance(self.unet, UNet2DModel) or getattr(config, "cross_attention_dim", None) is None:
            return "class"
        return "embedding"

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def image_channels(self) -> int:
        return self.vae.config.in_channels if self.vae is not None else self.unet.config.in_channels

    @property
    def resolution(self) -> int:
        size = self.unet.config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * self.vae_scale

    def model_shape(self) -> tuple[int, ...]:
        """Shape of one image in the UNet's space: latents [C, h, w] or pixels [C, H, W]."""
        size = self.unet.config.sample_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return (self.unet.config.in_channels, *size)

    def pipeline(self, unet=None, scheduler=None):
        """The diffusers pipeline object around these parts (shares their modules; nothing is copied)."""
        if self.pipeline_class is None:
            raise ConfigError("this model is a bare UNet, not a Stable Diffusion pipeline")
        components = {"vae": self.vae, "unet": unet or self.unet, "scheduler": scheduler or self.scheduler}
        if self.pipeline_class == "StableDiffusionXLPipeline":
            components.update(
                text_encoder=self.text_encoders[0], text_encoder_2=self.text_encoders[1],
                tokenizer=self.tokenizers[0], tokenizer_2=self.tokenizers[1],
                force_zeros_for_empty_prompt=self.pipeline_config.get("force_zeros_for_empty_prompt", True),
            )  # fmt: skip
        else:
            components.update(
                text_encoder=self.text_encoders[0], tokenizer=self.tokenizers[0],
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )  # fmt: skip
        return PIPELINES[self.pipeline_class](**components)

    def frozen_modules(self) -> list:
        return [m for m in [self.vae, *self.text_encoders] if m is not None]

    def to(self, device) -> DiffusionParts:
        """Moves the frozen parts (VAE, text encoders) to `device`; the UNet goes with the training loop."""
        for module in self.frozen_modules():
            module.to(device)
        return self


def _pipeline_index(name: str, revision: str | None, key: str) -> dict | None:
    """model_index.json of a pipeline folder or hub id; None for a bare-UNet folder."""
    root = Path(name).expanduser()
    if root.is_dir():
        index = root / "model_index.json"
        if index.is_file():
            return json.loads(index.read_text())
        if (root / "unet" / "config.json").is_file():
            return None
        raise ConfigError(
            f"config key '{key}': {name} is neither a diffusers pipeline folder (model_index.json) nor a "
            "folder with unet/ and scheduler/"
        )
    if name.startswith((".", "/", "~")) or root.exists():
        raise ConfigError(f"config key '{key}': model path not found: {name}")
    try:
        return StableDiffusionPipeline.load_config(name, revision=revision)
    except Exception as e:  # offline, no such repo, no access: one line for the user either way
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"config key '{key}': could not read {name!r} from the hub: {reason}") from None


def _unet_folder(root: Path):
    kind = json.loads((root / "unet" / "config.json").read_text()).get("_class_name", "UNet2DModel")
    unet_cls = UNet2DConditionModel if kind == "UNet2DConditionModel" else UNet2DModel
    return unet_cls.from_pretrained(root / "unet"), DDPMScheduler.from_pretrained(root / "scheduler")


def load_parts(model: DiffusionModelConfig | str, key: str = "model.name_or_path") -> DiffusionParts:
    """The frozen parts and the UNet of `model.name_or_path` (no LoRA), in float32, eval mode."""
    model = model if isinstance(model, DiffusionModelConfig) else DiffusionModelConfig(name_or_path=model)
    name = model.name_or_path
    if not name:
        raise ConfigError(
            f"config key '{key}' is empty: name a diffusers pipeline, a UNet folder or world:NAME"
        )
    if sources.is_source(name):
        loaded = sources.get(name, "diffusion", key).load()
        parts = loaded if isinstance(loaded, DiffusionParts) else DiffusionParts(*loaded)
    else:
        index = _pipeline_index(name, model.revision, key)
        if index is None:
            parts = DiffusionParts(*_unet_folder(Path(name).expanduser()))
        else:
            parts = _load_pipeline(name, index, model, key)
    for module in [parts.unet, *parts.frozen_modules()]:
        if any(p.dtype != torch.float32 for p in module.parameters()):  # e.g. variant fp16 weights
            module.to(torch.float32)
    for module in parts.frozen_modules():
        module.requires_grad_(False).eval()
    return parts


def _load_pipeline(name: str, index: dict, model: DiffusionModelConfig, key: str) -> DiffusionParts:
    kind = index.get("_class_name")
    if kind not in PIPELINES:
        raise ConfigError(
            f"config key '{key}': {name} is a {kind}; supported pipelines: {', '.join(PIPELINES)}"
        )
    kwargs = {"revision": model.revision, "variant": model.variant}
    if model.vae:
        try:
            kwargs["vae"] = AutoencoderKL.from_pretrained(model.vae)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"config key 'model.vae': could not load {model.vae}: {str(e).splitlines()[0]}"
            ) from None
    if kind == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        pipe = PIPELINES[kind].from_pretrained(name, **{k: v for k, v in kwargs.items() if v is not None})
    except (OSError, ValueError) as e:
        raise ConfigError(f"config key '{key}': could not load {name}: {str(e).splitlines()[0]}") from None
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if kind == "StableDiffusionXLPipeline" else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if kind == "StableDiffusionXLPipeline" else [])
    return DiffusionParts(
        unet=pipe.unet,
        scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        vae=pipe.vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        pipeline_class=kind,
        pipeline_config={k: v for k, v in pipe.config.items() if not isinstance(v, (list, tuple))},
    )


# ---------------------------------------------------------------- LoRA


def lora_config(unet, lora: LoraSettings) -> LoraConfig:
    """peft's LoraConfig for the UNet: every target named in `model.lora.target_modules` must exist in it (a
    ConfigError naming the others otherwise); unset, the default attention projections that it has."""
    if lora.target_modules:
        check_lora_targets(unet, lora.target_modules)
        targets = list(lora.target_modules)
    else:
        names = [n for n, _ in unet.named_modules()]
        targets = [t for t in UNET_LORA_TARGETS if any(n == t or n.endswith("." + t) for n in names)]
        if not targets:
            raise ConfigError(
                f"the UNet has none of the default LoRA targets {UNET_LORA_TARGETS}: set model.lora.target_modules"
            )
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)


def add_lora(unet, lora: LoraSettings, seed: int = 0):
    """Fresh LoRA adapters on the UNet (diffusers' `add_adapter` where the UNet has it); only they train.
    B = 0, so the network starts exactly at the base; A is drawn from `seed` (`core.models.seed_lora`)."""
    unet.requires_grad_(False)
    config = lora_config(unet, lora)
    if hasattr(unet, "add_adapter"):
        unet.add_adapter(config)
    else:
        unet = inject_adapter_in_model(config, unet)
    seed_lora(unet, seed)
    return unet


def load_base(cfg: DiffusionModelConfig, seed: int = 0) -> DiffusionParts:
    """The parts of `cfg`, with LoRA adapters on the UNet when asked; the UNet in train mode."""
    parts = load_parts(cfg)
    if cfg.lora.enabled:
        parts.unet = add_lora(parts.unet, cfg.lora, seed)
    if cfg.gradient_checkpointing:
        if not getattr(parts.unet, "_supports_gradient_checkpointing", False):
            raise ConfigError(
                f"config key 'model.gradient_checkpointing': {type(parts.unet).__name__} does not support it"
            )
        parts.unet.enable_gradient_checkpointing()
    parts.unet.train()
    return parts


def has_lora(unet) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in unet.modules())


def set_adapters_enabled(unet, enabled: bool) -> None:
    """Switch all LoRA layers on or off (off: the network is exactly the base model)."""
    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(enabled)


# ---------------------------------------------------------------- the trained model out and back in


def save_trained(unet, parts: DiffusionParts, lora: LoraSettings, final: Path) -> Path:
    """Write the trained UNet into `final` in the layout diffusers reads (see the module docstring)."""
    final = Path(final)
    if parts.pipeline_class is not None:
        if has_lora(unet):
            config = lora_config(unet, lora).to_dict()
            PIPELINES[parts.pipeline_class].save_lora_weights(
                final,
                unet_lora_layers=get_peft_model_state_dict(unet),
                unet_lora_adapter_metadata=config,
                safe_serialization=True,
            )
        else:
            unet.save_pretrained(final / "unet")
        return final
    merged = _merged(unet) if has_lora(unet) else unet
    merged.save_pretrained(final / "unet")
    parts.scheduler.save_pretrained(final / "scheduler")
    return final


def _merged(unet):
    """A copy of the UNet with its LoRA layers merged and replaced by their base layers (loads without peft)."""
    unet = copy.deepcopy(unet)
    set_adapters_enabled(unet, True)
    for name, module in list(unet.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent_name) if parent_name else unet, child, module.get_base_layer())
    return unet


def load_trained(
    run_dir: str | Path, model: DiffusionModelConfig, base: DiffusionParts | None = None
) -> DiffusionParts:
    """The parts of a finished run: the base's, with the UNet of `run_dir/final` (LoRA loaded through the
    pipeline's `load_lora_weights`, or the saved UNet), in eval mode. With `base` (the loaded base parts),
    its frozen modules are shared and only the UNet is copied."""
    final = Path(run_dir) / "final"
    if not final.is_dir():
        raise ConfigError(f"{run_dir} has no final/ (the run did not finish)")
    if not (final / LORA_FILE).is_file() and not (final / "unet").is_dir():
        raise ConfigError(f"{final} holds neither {LORA_FILE} nor unet/")
    if (final / LORA_FILE).is_file():
        parts = replace(base, unet=copy.deepcopy(base.unet)) if base is not None else load_parts(model)
        parts.pipeline().load_lora_weights(final)
    elif (final / "scheduler").is_dir():  # a bare-UNet run: its own folder layout
        unet, scheduler = _unet_folder(final)
        parts = (
            replace(base, unet=unet, scheduler=scheduler)
            if base is not None
            else DiffusionParts(unet, scheduler)
        )
    else:
        parts = base if base is not None else load_parts(model)
        parts = replace(parts, unet=type(parts.unet).from_pretrained(final / "unet"))
    parts.unet.eval()
    return parts


# ---------------------------------------------------------------- shared by the diffusion methods


def reference_strategy(cfg) -> str:
    strategy = cfg.model.reference.strategy
    return ("adapter" if cfg.model.lora.enabled else "frozen") if strategy == "auto" else strategy


def world_evaluation(cfg, parts: DiffusionParts):
    """evaluate_fn(unet) from the base's world source, when it has an evaluator and samples are asked for."""
    if cfg.data.eval_samples_per_class <= 0 or not sources.is_source(cfg.model.name_or_path):
        return None
    source = sources.get(cfg.model.name_or_path, "diffusion")
    if source.evaluate is None:
        return None
    return lambda unet: source.evaluate(
        replace(parts, unet=unet), samples_per_class=cfg.data.eval_samples_per_class
    )


def world_score(parts: DiffusionParts, cfg, samples_per_class: int = 50) -> dict:
    """The world's evaluator on samples of `parts` (a run whose base is a world source), else {}."""
    if not sources.is_source(cfg.model.name_or_path):
        return {}
    source = sources.get(cfg.model.name_or_path, "diffusion")
    if source.evaluate is None:
        return {}
    return {k: float(v) for k, v in source.evaluate(parts, samples_per_class=samples_per_class).items()}
