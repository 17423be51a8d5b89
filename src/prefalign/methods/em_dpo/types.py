"""EM-DPO's K type policies on one base model: one LoRA adapter per type (`peft`), or, for tiny models,
K full copies behind the same interface (`TypeCopies`). The reference is the base with adapters disabled."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from prefalign.core.errors import ConfigError
from prefalign.core.models import LoraSettings, add_lora, lora_config, seed_lora


def add_type_adapters(base, lora: LoraSettings, n_types: int, seed: int = 0, names=None):
    """PeftModel with fresh LoRA adapters type0..type{K-1}, or `names` (each starts equal to the reference)."""
    adapters = list(names) if names is not None else [f"type{k}" for k in range(n_types)]
    model = add_lora(base, lora, adapter_name=adapters[0], seed=seed)
    for name in adapters[1:]:
        model.add_adapter(name, lora_config(lora))
    seed_lora(model, seed, adapters[1:])
    activate(model, adapters[0])
    return model, adapters


class TypeCopies(torch.nn.Module):
    """`em.adapter: full`: K full copies of a small policy behind the part of peft's interface that EM-DPO and
    aggregation use (set_adapter, disable_adapter, set_requires_grad, save_pretrained). Memory: K + 1 models
    plus AdamW state for K models, vs one model + K small adapters for LoRA, so only for small models. On the
    reviews world's 117K-parameter GPT-2, LoRA DPO learns a much weaker reward than full fine-tuning."""

    def __init__(self, base, names):
        super().__init__()
        self.copies = torch.nn.ModuleDict({name: copy.deepcopy(base).requires_grad_(True) for name in names})
        self.reference = base.requires_grad_(False)
        self.peft_config = dict.fromkeys(names)  # adapter names, as on a PeftModel
        self.active, self.disabled = names[0], False

    def current(self):
        return self.reference if self.disabled else self.copies[self.active]

    @property
    def config(self):  # the copies share the base's config (generation reads its position limit)
        return self.reference.config

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.current().generate(*args, **kwargs)

    def set_adapter(self, name: str) -> None:
        self.active = name

    def set_requires_grad(self, names, requires_grad: bool = True) -> None:
        for name in names:
            self.copies[name].requires_grad_(requires_grad)

    @contextlib.contextmanager
    def disable_adapter(self):
        self.disabled = True
        try:
            yield
        finally:
            self.disabled = False

    def save_pretrained(self, path, selected_adapters=None, safe_serialization=True):
        for name in selected_adapters or list(self.copies):
            self.copies[name].save_pretrained(Path(path) / name, safe_serialization=True)


def type_policies(base, em, lora: LoraSettings, seed: int = 0, names=None):
    """(model, adapter names): LoRA adapters on `base` (em.adapter: lora) or full copies (em.adapter: full),
    named type0..type{K-1} or `names`."""
    names = list(names) if names is not None else [f"type{k}" for k in range(em.n_types)]
    if em.adapter == "full":
        return TypeCopies(base, names), names
    if em.adapter != "lora":
        raise ConfigError(f"config key 'em.adapter' must be 'lora' or 'full', got {em.adapter!r}")
    return add_type_adapters(base, lora, em.n_types, seed, names)


def reset_types(model, names, seed: int) -> None:
    """Every policy in `names` back to the reference: full copies get the base's weights again; LoRA adapters
    B = 0 and A drawn again from `seed` (an EM restart starts from fresh policies)."""
    with torch.no_grad():
        if isinstance(model, TypeCopies):
            for name in names:
                model.copies[name].load_state_dict(model.reference.state_dict())
            return
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name and any(f".{name}." in param_name for name in names):
                param.zero_()
    seed_lora(model, seed, list(names))


def copy_type(model, source: str, target: str) -> None:
    """Policy `target` := policy `source` (weights copied; both stay separate policies)."""
    with torch.no_grad():
        if isinstance(model, TypeCopies):
            model.copies[target].load_state_dict(model.copies[source].state_dict())
            return
        params = dict(model.named_parameters())
        for param_name, param in params.items():
            if f".{source}." in param_name:
                params[param_name.replace(f".{source}.", f".{target}.")].copy_(param)


def activate(model, name: str) -> None:
    """Route forwards through adapter `name`, keeping every adapter trainable (peft's set_adapter
    would freeze the others, which would hide them from the optimizer)."""
    model.set_adapter(name)
    model.set_requires_grad(list(model.peft_config), True)


def load_adapters(base, root, names):
    """PeftModel over `base` with the adapters saved under root/<name>/ (TypeCopies for em.adapter: full)."""
    if not (Path(root) / names[0] / "adapter_config.json").is_file():  # em.adapter: full
        model = TypeCopies(base, names)
        for name in names:
            model.copies[name] = AutoModelForCausalLM.from_pretrained(Path(root) / name)
        return model
    model = PeftModel.from_pretrained(base, Path(root) / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(Path(root) / name, adapter_name=name)
    return model
