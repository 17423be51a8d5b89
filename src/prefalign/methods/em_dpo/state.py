"""EM-DPO's run state between iterations (what a killed run resumes from)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from prefalign.core.checkpoint import trainable_state


class EMState:
    """What an EM-DPO run keeps between iterations, saved atomically after each one to RUN/em/iter-N/
    (every policy's trainable weights, γ, η, the log, whether this restart has finished), so a killed run
    resumes at the last finished iteration; restart r > 0 keeps its own in RUN/em/restart-r/. An iteration's
    M-step checkpoints itself like any `fit` (RUN/m_steps/[restart-r/]iter-N/)."""

    def __init__(self, run_dir: Path | None, restart: int = 0):
        self.root = None if not run_dir else Path(run_dir) / "em" / (f"restart-{restart}" if restart else "")
        self.m_steps = (
            None if not run_dir else Path(run_dir) / "m_steps" / (f"restart-{restart}" if restart else "")
        )

    def latest(self) -> Path | None:
        if self.root is None or not self.root.is_dir():
            return None
        done = [p for p in self.root.glob("iter-*") if (p / "state.json").is_file()]
        return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None

    def save(self, iteration: int, model, gamma, eta, history, done: bool = False) -> None:
        if self.root is None:
            return
        final, tmp = self.root / f"iter-{iteration}", self.root / f".tmp-iter-{iteration}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        save_file({"gamma": torch.as_tensor(gamma), "eta": torch.as_tensor(eta)}, tmp / "gamma.safetensors")
        state = {"iteration": iteration, "history": history, "done": done}
        (tmp / "state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self.root.glob("iter-*"):  # the newest is enough to resume
            if old != final:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, model):
        """-> (iteration, γ, η, history, done), with the saved weights copied into `model`."""
        weights = load_file(path / "trainable.safetensors")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
        arrays = load_file(path / "gamma.safetensors")
        state = json.loads((path / "state.json").read_text())
        done = state.get("done", False)
        return state["iteration"], arrays["gamma"].numpy(), arrays["eta"].numpy(), state["history"], done
