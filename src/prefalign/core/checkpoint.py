"""Atomic checkpoints and exact resume: trainable weights, optimizer, scheduler, RNG and data position.

A checkpoint `RUN/checkpoints/step-N/` is written to a temp dir and renamed into place, so a kill at any
moment leaves the previous checkpoint intact; it counts as complete once `trainer_state.json` is in it.
Only parameters with `requires_grad` are saved (LoRA: only the adapters), as safetensors; the optimizer,
scheduler and RNG states go through `torch.save` and are read back with `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import extract_model_from_parallel as unwrap
from safetensors.torch import load_file, save_file


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
        "python_gauss": random.getstate()[2],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": np_state[2],
            "has_gauss": np_state[3],
            "gauss": np_state[4],
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[-1], tuple(py[:-1]), state["python_gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        ("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad
    }


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint is complete once it has trainer_state.json)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    trainer_state: dict,
    accelerator,
    stateful: dict | None = None,
    keep: int = 2,
) -> Path:
    """Write `checkpoints/step-N` atomically: everything goes to a temp dir which is renamed at the end."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"  # one name for all ranks (a per-process pid broke multi-process saves)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rank = accelerator.process_index
    torch.save(_rng_state(), tmp / f"rng-{rank}.pt")
    if accelerator.is_main_process:
        save_file(trainable_state(unwrap(model)), tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if stateful:
            torch.save({k: v.state_dict() for k, v in stateful.items()}, tmp / "stateful.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))  # marks the checkpoint complete
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # re-saving the same step after a resume
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    path: Path, model, optimizer, scheduler, accelerator, stateful: dict | None = None
) -> dict:
    path = Path(path)
    weights = load_file(path / "trainable.safetensors")
    bare = unwrap(model)
    params = dict(bare.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing[:3]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if stateful and (path / "stateful.pt").is_file():
        saved = torch.load(path / "stateful.pt", weights_only=True)
        for key, obj in stateful.items():
            obj.load_state_dict(saved[key])
    rng = path / f"rng-{accelerator.process_index}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())
