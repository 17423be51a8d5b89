"""Shared diffusion mechanics: per-sample noise-prediction error, sampling, loading and saving UNets.

Diffusion-DPO and SSPO compare how well two networks denoise the same images. Both need
`e(θ, x) = mean over pixels ‖target − f_θ(x_t, c, t)‖²` where `x_t` is `x` noised at timestep `t`
with noise `ε`, and the target is `ε` (epsilon prediction), the velocity `v` (v-prediction) or `x`
(sample prediction), as the scheduler's `prediction_type` says. Every image of one training example
(winner and loser, or winner and reference sample) must share ONE `t` and ONE `ε`, otherwise the
difference of errors measures the noise draw instead of the model: `paired_errors` enforces that.

Works for `UNet2DModel` (integer class labels) and `UNet2DConditionModel` (float embeddings
[B, L, D] as `encoder_hidden_states`); a dict condition is passed as keyword arguments.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

from prefalign.core import sources
from prefalign.core.errors import ConfigError
from prefalign.core.models import LoraSettings, seed_lora

# ---------------------------------------------------------------- noise-prediction error


def unet_forward(unet, noisy: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
    """Call a diffusers UNet with its condition: int labels -> class_labels, float [B,L,D] -> encoder states."""
    if cond is None:
        out = unet(noisy, timesteps)
    elif isinstance(cond, dict):
        out = unet(noisy, timesteps, **cond)
    elif not torch.is_floating_point(cond):
        out = unet(noisy, timesteps, class_labels=cond)
    else:
        out = unet(noisy, timesteps, encoder_hidden_states=cond)
    return out.sample if hasattr(out, "sample") else out


def training_target(
    scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    if kind == "sample":
        return x0
    raise ValueError(f"unknown scheduler prediction_type {kind!r}: expected epsilon, v_prediction or sample")


def noise_pred_error(unet, scheduler, x0, cond, timesteps, noise) -> torch.Tensor:
    """Per-sample mean squared error of the UNet's prediction, shape [B]."""
    noisy = scheduler.add_noise(x0, noise, timesteps)
    pred = unet_forward(unet, noisy, timesteps, cond)
    target = training_target(scheduler, x0, noise, timesteps)
    return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)


def draw_timesteps_and_noise(scheduler, x0: torch.Tensor, generator=None):
    """One timestep per example and one noise tensor shaped like `x0` (to be shared by its images)."""
    n = scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, n, (len(x0),), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    return timesteps, noise


def _repeat_cond(cond, k: int):
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {key: _repeat_cond(value, k) for key, value in cond.items()}
    return torch.cat([cond] * k)


def paired_errors(unet, scheduler, images: list[torch.Tensor], cond, timesteps, noise) -> list[torch.Tensor]:
    """Errors of k image groups [B,...] that share `cond`, `timesteps` and `noise`; ONE forward of k·B."""
    k = len(images)
    errors = noise_pred_error(
        unet,
        scheduler,
        torch.cat(images),
        _repeat_cond(cond, k),
        timesteps.repeat(k),
        noise.repeat(k, *[1] * (noise.dim() - 1)),
    )
    return list(errors.chunk(k))


# ---------------------------------------------------------------- sampling


@torch.no_grad()
def sample(
    unet,
    scheduler,
    cond,
    shape,
    steps: int = 20,
    sampler: str = "ddim",
    generator=None,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
):
    """Draw images for `cond` by running `steps` reverse steps of DDIM (`eta` = 0: deterministic) or DDPM,
    starting from `noise` [B, *shape] when given (DDIM with eta 0 is then a pure function of it).

    A fresh scheduler is built from `scheduler.config` each call, so the training scheduler keeps its state.
    Returns [B, *shape] clipped to [-1, 1].
    """
    schedulers = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
    if sampler not in schedulers:
        raise ValueError(f"sampler must be one of {sorted(schedulers)}, got {sampler!r}")
    sched = schedulers[sampler].from_config(scheduler.config)
    sched.set_timesteps(steps)
    batch = len(cond) if torch.is_tensor(cond) else len(next(iter(cond.values())))
    device = next(unet.parameters()).device
    x = (noise if noise is not None else torch.randn((batch, *shape), generator=generator)).to(device)
    was_training = unet.training
    unet.eval()
    for t in sched.timesteps:
        out = unet_forward(unet, x, t.expand(batch).to(device), cond)
        kwargs = {"eta": eta} if sampler == "ddim" else {}
        x = sched.step(out, t, x, generator=generator, **kwargs).prev_sample
    unet.train(was_training)
    return x.clamp(-1, 1)


# ---------------------------------------------------------------- models for the recipes


UNET_LORA_TARGETS = ["conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class DiffusionReference:
    strategy: Literal["auto", "frozen", "adapter"] = "auto"  # auto: adapter with LoRA, else a frozen copy


@dataclass
class DiffusionModelConfig:
    """`model:` of the diffusion methods: the UNet to align (full fine-tuning, or LoRA via peft)."""

    name_or_path: str = ""  # a diffusers folder with unet/ and scheduler/, or a source: world:digits(-quick)
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


def load_unet(name_or_path: str, key: str = "model.name_or_path"):
    """`(unet, scheduler)` from a registered diffusion source or a diffusers folder with unet/ + scheduler/."""
    if not name_or_path:
        raise ConfigError(f"config key '{key}' is empty: name a diffusers folder or world:NAME")
    if sources.is_source(name_or_path):
        return sources.get(name_or_path, "diffusion", key).load()
    root = Path(name_or_path)
    if not (root / "unet" / "config.json").is_file():
        raise ConfigError(f"config key '{key}': {name_or_path!r} is not a folder with unet/ and scheduler/")
    kind = json.loads((root / "unet" / "config.json").read_text()).get("_class_name", "UNet2DModel")
    unet_cls = UNet2DConditionModel if kind == "UNet2DConditionModel" else UNet2DModel
    return unet_cls.from_pretrained(root / "unet"), DDPMScheduler.from_pretrained(root / "scheduler")


def load_base(cfg: DiffusionModelConfig, seed: int = 0):
    """`(unet, scheduler)` with LoRA adapters (started from `seed`) added when asked; only trainable
    parameters require grad."""
    unet, scheduler = load_unet(cfg.name_or_path)
    if cfg.lora.enabled:
        unet.requires_grad_(False)
        names = {n.rsplit(".", 1)[-1] for n, _ in unet.named_modules()} | {n for n, _ in unet.named_modules()}
        wanted = cfg.lora.target_modules or UNET_LORA_TARGETS
        targets = [t for t in wanted if t in names or any(n.endswith("." + t) for n in names)]
        if not targets:
            raise ConfigError(f"config key 'model.lora.target_modules': {wanted} match no module of the UNet")
        lora = LoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=targets
        )
        unet = inject_adapter_in_model(lora, unet)  # any diffusers UNet; B = 0, so it starts at the base
        seed_lora(unet, seed)
    unet.train()
    return unet, scheduler


def set_adapters_enabled(unet, enabled: bool) -> None:
    """Switch all LoRA layers on or off (off: the network is exactly the base model)."""
    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(enabled)


def save_unet(unet, scheduler, final: Path) -> Path:
    """`final/unet` + `final/scheduler` (diffusers layout, safetensors); LoRA adapters are merged in first."""
    unet = copy.deepcopy(unet)
    if any(isinstance(m, BaseTunerLayer) for m in unet.modules()):
        set_adapters_enabled(unet, True)
        for module in unet.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
        unet = _strip_lora(unet)
    unet.save_pretrained(Path(final) / "unet")
    scheduler.save_pretrained(Path(final) / "scheduler")
    return Path(final)


def _strip_lora(unet):
    """Replace merged LoRA layers by their base layers so the saved UNet loads without peft."""
    for name, module in list(unet.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent_name) if parent_name else unet, child, module.get_base_layer())
    return unet


def load_final(run_dir: str | Path):
    """`(unet, scheduler)` of a finished run (its `final/` folder), in eval mode."""
    unet, scheduler = load_unet(str(Path(run_dir) / "final"))
    return unet.eval(), scheduler


def world_evaluation(cfg, scheduler):
    """evaluate_fn(unet) from the base's world source, when it has an evaluator and samples are asked for."""
    if cfg.data.eval_samples_per_class <= 0 or not sources.is_source(cfg.model.name_or_path):
        return None
    source = sources.get(cfg.model.name_or_path, "diffusion")
    if source.evaluate is None:
        return None
    return lambda unet: source.evaluate(unet, scheduler, samples_per_class=cfg.data.eval_samples_per_class)


def reference_strategy(cfg) -> str:
    strategy = cfg.model.reference.strategy
    return ("adapter" if cfg.model.lora.enabled else "frozen") if strategy == "auto" else strategy


def evaluate_final(run_dir: Path, cfg) -> dict:
    """The world's evaluator on samples of a run's `final/` UNet (a run whose base is a world source)."""
    if not sources.is_source(cfg.model.name_or_path):
        raise ConfigError(
            f"{run_dir}: ground-truth evaluation needs a run on a world base (model.name_or_path: world:...)"
        )
    source = sources.get(cfg.model.name_or_path, "diffusion")
    unet, scheduler = load_final(run_dir)
    return {k: float(v) for k, v in source.evaluate(unet, scheduler, samples_per_class=50).items()}
