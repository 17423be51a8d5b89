"""A run's trained model as a folder other tools open: `prefalign export RUN_DIR OUT [--merge-lora]`.

What `final/` holds decides what OUT gets (the run itself is never changed):
- a full causal LM (`config.json`): a copy, already `AutoModelForCausalLM.from_pretrained`-ready;
- a LoRA adapter (`adapter_config.json`): the adapter (`PeftModel.from_pretrained`, with the base path it
  records), or, with `merge_lora`, the base with the adapter merged in: a plain transformers model;
- EM-DPO's per-type adapters (`adapters/type*/`): one folder per type, each as above;
- anything else (a diffusion UNet + scheduler, a PFM flow): a copy (its own loader reads it).

Checkpoints (`checkpoints/step-N/`) hold only the trainable tensors, optimizer and RNG state, for exact
resume; `export_checkpoint` turns one into a model folder the same way.

Adapters record a base that resolves from anywhere: `world:NAME` for a world's model (`load_base_model`
resolves it; plain peft cannot, so export those with `merge_lora`), the absolute path of a local folder,
or the hub id as given (`record_base_model`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoTokenizer

from prefalign.core import sources
from prefalign.core.errors import ConfigError
from prefalign.core.models import load_base_model, load_policy, save_model


def resolvable_base(name_or_path: str) -> str:
    """How an adapter should name its base: `world:NAME` as is, an existing local folder as an absolute
    path, anything else (a hub id) as given."""
    if not name_or_path or sources.is_source(name_or_path):
        return name_or_path
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def record_base_model(folder: Path, name_or_path: str) -> None:
    """Set `base_model_name_or_path` of every adapter under `folder` to `resolvable_base(name_or_path)`
    (peft writes the path the base was loaded from: relative, or a world's cache folder)."""
    if not name_or_path:
        return
    for path in Path(folder).rglob("adapter_config.json"):
        config = json.loads(path.read_text())
        config["base_model_name_or_path"] = resolvable_base(name_or_path)
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _base_config(model_cfg, adapter_dir: Path):
    """`model_cfg` with its base located: the config's own name when it resolves from here, else the
    absolute path the adapter recorded (a run exported from another folder than it was trained in)."""
    name = model_cfg.name_or_path
    if sources.is_source(name) or Path(name).expanduser().exists():
        return model_cfg
    config_path = adapter_dir / "adapter_config.json"
    recorded = json.loads(config_path.read_text()).get("base_model_name_or_path", "")
    if recorded and Path(recorded).is_absolute() and Path(recorded).exists():
        return dataclasses.replace(model_cfg, name_or_path=recorded)
    return model_cfg


def _write_lm(adapter_dir: Path, tokenizer_dir: Path, model_cfg, out: Path, merge_lora: bool) -> str:
    if not merge_lora:
        shutil.copytree(adapter_dir, out, dirs_exist_ok=True)
        if tokenizer_dir != adapter_dir:
            shutil.copytree(tokenizer_dir, out, dirs_exist_ok=True)
        return "LoRA adapter (peft's PeftModel.from_pretrained / AutoPeftModelForCausalLM)"
    base = load_base_model(_base_config(model_cfg, adapter_dir))
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    save_model(merged, AutoTokenizer.from_pretrained(tokenizer_dir), out)
    return "merged model (transformers' AutoModelForCausalLM.from_pretrained)"


def export_final(final: Path, model_cfg, out: Path, merge_lora: bool = False) -> str:
    """Write the model of `final/` to `out` (see the module docstring); returns what was written."""
    final, out = Path(final), Path(out)
    if not final.is_dir():
        raise ConfigError(f"{final.parent} has no final/ (the run did not finish)")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"export: {out} exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    card = final / "README.md"
    if (final / "adapter_config.json").is_file():
        what = _write_lm(final, final, model_cfg, out, merge_lora)
    elif (final / "adapters").is_dir():  # EM-DPO: one adapter per latent type
        types = sorted(p.parent for p in (final / "adapters").rglob("adapter_config.json"))
        for adapter in types:
            _write_lm(adapter, final / "tokenizer", model_cfg, out / adapter.name, merge_lora)
        for extra in ("gamma.csv", "eta.json"):
            if (final / extra).is_file():
                shutil.copy2(final / extra, out / extra)
        what = f"{len(types)} type policies ({', '.join(p.name for p in types)}), each a " + (
            "merged model" if merge_lora else "LoRA adapter"
        )
    else:
        shutil.copytree(final, out, dirs_exist_ok=True)
        what = "a copy of final/" + (" (a full model: nothing to merge)" if merge_lora else "")
    if card.is_file():
        shutil.copy2(card, out / "README.md")
    return what


def export_checkpoint(checkpoint: Path, model_cfg, seed: int, out: Path, merge_lora: bool = False) -> str:
    """A causal-LM checkpoint (`checkpoints/step-N/`) as a model folder: the policy built as the run built it
    (base + LoRA from `seed`), its trainable tensors loaded, then written like `final/`."""
    checkpoint, out = Path(checkpoint), Path(out)
    weights = checkpoint / "trainable.safetensors"
    if not weights.is_file():
        raise ConfigError(f"{checkpoint} is not a complete checkpoint (no trainable.safetensors)")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"export: {out} exists and is not empty; choose a new folder")
    policy, tokenizer = load_policy(model_cfg, seed=seed)
    state = load_file(weights)
    params = dict(policy.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ConfigError(
            f"{checkpoint}: tensors {unknown[:3]} are not parameters of the model the run built"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
    if merge_lora and isinstance(policy, PeftModel):
        policy = policy.merge_and_unload()
    save_model(policy, tokenizer, out)
    record_base_model(out, model_cfg.name_or_path)
    return "merged model" if merge_lora or not isinstance(policy, PeftModel) else "LoRA adapter"
