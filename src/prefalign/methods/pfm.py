"""Preference Flow Matching (Kim et al., "Preference Alignment with Flow Matching", NeurIPS 2024, 2405.19806).

A frozen black-box reference generator pi_ref(y|x) produced pairs (y+, y-) with y+ preferred. PFM learns a
vector field v(t, y | x) that carries the distribution of rejected samples (t=0) to that of chosen samples
(t=1) by conditional flow matching; at inference a reference sample is pushed along the ODE
dy/dt = v(t, y | x) from t=0 to t=1. No reward model, and the generator's weights are never touched.

    y_t = t * y+ + (1 - t) * y- + sigma * eps,   eps ~ N(0, I),  t ~ U[0, 1]
    loss = || v(t, y_t | x) - (y+ - y-) ||^2                     (source = rejected, target = chosen)

If y, y' ~ pi_ref and the preferred one is kept, its density is 2 pi_ref(y) P(y > y'): PFM's target is the
best-of-2 distribution, reached without calling the judge at inference. Iterative PFM: `reapply` the same
flow k times (what the reference code does), or `recollect` (sample the improved policy, label new pairs with
the judge, fit a new flow on top; ~ best-of-2^k after k rounds).

Choices that are ours, not the paper's (switchable): coupling `pairs` (keep the annotated pairs; default) or
`ot` (exact minibatch OT re-pairing within each context, by scipy's `linear_sum_assignment`: with uniform
weights and equal sizes the optimal plan is a permutation; the reference code re-pairs across contexts);
sinusoidal time embedding + additive context embedding; solvers euler/midpoint/rk4 and dopri5 (torchdiffeq).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy.optimize import linear_sum_assignment
from torch import nn

from prefalign.core import extras
from prefalign.core.config import build, build_loss
from prefalign.core.data_files import read_arrays
from prefalign.core.errors import ConfigError, DataError
from prefalign.core.train import Job, TrainConfig, fit
from prefalign.losses.flow import flow_matching_loss


@dataclass
class FlowModelConfig:
    """`model:` — the vector field v_θ(t, y | x) that is trained (the generator itself is a black box)."""

    network: Literal["mlp", "conv"] = "mlp"  # conv needs samples shaped [C, H, W]
    hidden: int = 256  # width of the hidden layers (conv: channels)
    depth: int = 3  # hidden layers
    time_dim: int = 64  # size of the time embedding
    num_classes: int = 0  # class contexts: 0 infers max label + 1

    def validate(self):
        if self.hidden < 1 or self.depth < 1 or self.time_dim < 2:
            raise ConfigError(
                "config keys 'model.hidden', 'model.depth' must be >= 1 and 'model.time_dim' >= 2"
            )


@dataclass
class FlowDataConfig:
    """`data:` — pairs of vectors: arrays chosen, rejected [N, ...] and optional context (labels or vectors)."""

    train: str = ""  # .npz / .safetensors
    eval_fraction: float = 0.05  # held-out pairs for eval/loss

    def validate(self):
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"config key 'data.eval_fraction' must be in [0, 1), got {self.eval_fraction}")


@dataclass
class FlowSettings:
    """`flow:` — the probability path and the ODE solver."""

    sigma: float = 0.05  # path noise; the reference code uses 0.1, 0 gives straight rectified-flow paths
    coupling: Literal["pairs", "ot"] = "pairs"  # pairs as labelled, or re-paired by optimal transport
    solver: Literal["euler", "midpoint", "rk4", "dopri5"] = "midpoint"  # ODE solver that applies the flow
    solver_steps: int = 8  # fixed-step solvers
    rtol: float = 1e-5  # dopri5
    atol: float = 1e-5  # dopri5

    def validate(self):
        if self.sigma < 0:
            raise ConfigError(f"config key 'flow.sigma' must be >= 0, got {self.sigma}")
        if self.solver_steps < 1:
            raise ConfigError(f"config key 'flow.solver_steps' must be >= 1, got {self.solver_steps}")


@dataclass
class LossConfig:
    name: str = "flow_matching"  # the only loss: flow_matching

    def validate(self):
        build_loss(self, LOSSES)


@dataclass
class Config:
    method: str = "pfm"
    model: FlowModelConfig = field(default_factory=FlowModelConfig)
    data: FlowDataConfig = field(default_factory=FlowDataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    flow: FlowSettings = field(default_factory=FlowSettings)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            output_dir="runs/pfm", max_steps=3000, batch_size=256, learning_rate=1e-3, log_every=100
        )
    )


LOSSES = {"flow_matching": flow_matching_loss}
RENAMES = {
    "data": lambda v: {"data.train": v} if isinstance(v, str) else None,
    "val_fraction": "data.eval_fraction",
    **{f"{k}": f"model.{k}" for k in ("network", "hidden", "depth", "time_dim", "num_classes")},
    **{f"{k}": f"flow.{k}" for k in ("sigma", "coupling", "solver", "solver_steps", "rtol", "atol")},
}


# ---------------------------------------------------------------- vector fields


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (scaled by 1000 so that the slow frequencies still move)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
    angles = 1000 * t[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Conditioning(nn.Module):
    """emb(t) + emb(context): context is a class label (nn.Embedding), a vector (nn.Linear) or absent."""

    def __init__(self, dim, time_dim, context_kind="none", num_classes=0, context_dim=0):
        super().__init__()
        self.time_dim, self.context_kind = time_dim, context_kind
        self.time = nn.Sequential(nn.Linear(time_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        if context_kind not in ("none", "class", "vector"):
            raise ValueError(f"context kind must be none, class or vector, got {context_kind!r}")
        self.context = None
        if context_kind == "class":
            self.context = nn.Embedding(num_classes, dim)
        elif context_kind == "vector":
            self.context = nn.Linear(context_dim, dim)

    def forward(self, t, y, context):
        t = torch.as_tensor(t, dtype=y.dtype, device=y.device).reshape(-1).expand(len(y))  # a 0-d t is fine
        cond = self.time(time_embedding(t, self.time_dim))
        if (context is None) != (self.context is None):
            raise ValueError(
                f"this flow expects context of kind '{self.context_kind}', got {type(context).__name__}"
            )
        return cond if context is None else cond + self.context(context)


class MLPField(nn.Module):
    """v(t, y | x) for flat vectors: residual MLP blocks, conditioning added before every block."""

    def __init__(self, shape, hidden=256, depth=3, time_dim=64, **context):
        super().__init__()
        dim = math.prod(shape)
        self.cond = Conditioning(hidden, time_dim, **context)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, t, y, context=None):
        cond = self.cond(t, y, context)
        h = self.inp(y.flatten(1))
        for block in self.blocks:
            h = h + block(h + cond)
        return self.out(h).reshape(y.shape)


class ConvField(nn.Module):
    """v(t, y | x) for small images [C, H, W]: residual 3x3 conv blocks, conditioning added as a bias map."""

    def __init__(self, shape, hidden=64, depth=3, time_dim=64, **context):
        super().__init__()
        if len(shape) != 3:
            raise ValueError(
                f"network 'conv' needs samples shaped [N, C, H, W], got sample shape {list(shape)}"
            )
        groups = math.gcd(8, hidden)
        self.cond = Conditioning(hidden, time_dim, **context)
        self.inp = nn.Conv2d(shape[0], hidden, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.ModuleList([nn.GroupNorm(groups, hidden), nn.Conv2d(hidden, hidden, 3, padding=1),
                           nn.GroupNorm(groups, hidden), nn.Conv2d(hidden, hidden, 3, padding=1)])
            for _ in range(depth)
        )  # fmt: skip
        self.out = nn.Sequential(
            nn.GroupNorm(groups, hidden), nn.SiLU(), nn.Conv2d(hidden, shape[0], 3, padding=1)
        )

    def forward(self, t, y, context=None):
        cond = self.cond(t, y, context)[:, :, None, None]
        h = self.inp(y)
        for norm1, conv1, norm2, conv2 in self.blocks:
            h = h + conv2(F.silu(norm2(conv1(F.silu(norm1(h))) + cond)))
        return self.out(h)


def build_field(cfg: FlowModelConfig, shape, context_kind="none", num_classes=0, context_dim=0) -> nn.Module:
    field_cls = {"mlp": MLPField, "conv": ConvField}[cfg.network]
    context = {"context_kind": context_kind, "num_classes": num_classes, "context_dim": context_dim}
    return field_cls(tuple(shape), hidden=cfg.hidden, depth=cfg.depth, time_dim=cfg.time_dim, **context)


# ---------------------------------------------------------------- loss and coupling


def interpolate(source, target, t, noise, sigma: float):
    """The CFM path and its target velocity: y_t = t*target + (1-t)*source + sigma*noise, u = target - source."""
    t = t.reshape(-1, *[1] * (source.dim() - 1))
    return t * target + (1 - t) * source + sigma * noise, target - source


def ot_pairing(source, target, context=None) -> torch.Tensor:
    """Index `perm` such that (source[i], target[perm[i]]) is an exact minibatch OT coupling (squared L2 cost),
    solved separately inside each group of equal contexts, so pairs never cross contexts. Uniform weights on
    equal-size sets make the optimal plan a permutation (Birkhoff), found by `linear_sum_assignment`."""
    rows, perm = torch.arange(len(source)), torch.arange(len(source))
    if context is None:
        groups = [rows]
    else:
        _, inverse = torch.unique(context.reshape(len(context), -1), dim=0, return_inverse=True)
        groups = [rows[inverse == g] for g in inverse.unique()]
    for idx in groups:
        cost = torch.cdist(source[idx].flatten(1).double(), target[idx].flatten(1).double()).pow(2)
        perm[idx] = idx[torch.as_tensor(assignment(cost.cpu().numpy()))]
    return perm.to(source.device)


def assignment(cost: np.ndarray) -> np.ndarray:
    """`match[i]`: the column row i is matched to in a minimum-cost perfect matching of a square cost matrix."""
    rows, cols = linear_sum_assignment(cost)
    match = np.empty(len(rows), dtype=np.int64)
    match[rows] = cols
    return match


def flow_step(field, batch, sigma: float, coupling: str = "pairs"):
    """One training step's loss for a batch {'chosen', 'rejected', optional 'context'}: source = rejected."""
    rejected, chosen, context = batch["rejected"], batch["chosen"], batch.get("context")
    if coupling == "ot":
        chosen = chosen[ot_pairing(rejected, chosen, context)]
    t = torch.rand(len(chosen), device=chosen.device)
    y_t, velocity = interpolate(rejected, chosen, t, torch.randn_like(chosen), sigma)
    losses = flow_matching_loss(field(t, y_t, context), velocity)
    return losses.mean(), {"flow/target_speed": velocity.flatten(1).norm(dim=1).mean()}


# ---------------------------------------------------------------- ODE solvers


def integrate(field, y, context=None, method="midpoint", steps=8, rtol=1e-5, atol=1e-5):
    """Solve dy/dt = field(t, y, context) from t=0 to 1. Returns (y(1), number of field evaluations)."""
    nfe = 0

    def velocity(t, y):
        nonlocal nfe
        nfe += 1
        return field(t, y, context)

    if method == "dopri5":
        extras.require("flow", "flow.solver: dopri5")
        from torchdiffeq import odeint  # lazy: only the adaptive solver needs it (prefalign[flow])

        times = torch.tensor([0.0, 1.0], dtype=y.dtype, device=y.device)
        return odeint(velocity, y, times, method="dopri5", rtol=rtol, atol=atol)[-1], nfe
    if method not in ("euler", "midpoint", "rk4"):
        raise ValueError(f"unknown solver '{method}'; choose euler, midpoint, rk4 or dopri5")
    h = 1.0 / steps
    for i in range(steps):
        t = torch.tensor(i * h, dtype=y.dtype, device=y.device)
        if method == "euler":
            y = y + h * velocity(t, y)
        elif method == "midpoint":
            y = y + h * velocity(t + h / 2, y + h / 2 * velocity(t, y))
        else:
            k1 = velocity(t, y)
            k2 = velocity(t + h / 2, y + h / 2 * k1)
            k3 = velocity(t + h / 2, y + h / 2 * k2)
            k4 = velocity(t + h, y + h * k3)
            y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return y, nfe


# ---------------------------------------------------------------- the black-box API


def check_pairs(chosen, rejected, context=None, source="pairs"):
    """Tensors, same shapes, finite values; errors name `source`, the field and the row."""
    chosen = torch.as_tensor(np.asarray(chosen) if not torch.is_tensor(chosen) else chosen)
    rejected = torch.as_tensor(np.asarray(rejected) if not torch.is_tensor(rejected) else rejected)
    arrays = {"chosen": chosen.float(), "rejected": rejected.float()}
    if chosen.dim() < 2 or chosen.shape != rejected.shape or len(chosen) == 0:
        raise DataError(
            f"{source}: 'chosen' and 'rejected' must be non-empty arrays of the same shape [N, ...], "
            f"got {list(chosen.shape)} and {list(rejected.shape)}"
        )
    if context is not None:
        context = torch.as_tensor(np.asarray(context) if not torch.is_tensor(context) else context)
        if len(context) != len(chosen):
            raise DataError(f"{source}: 'context' has {len(context)} rows but 'chosen' has {len(chosen)}")
        if context.dtype.is_floating_point:
            arrays["context"] = context.float().reshape(len(context), -1)
        elif context.dim() == 1 and context.dtype != torch.bool:
            arrays["context"] = context.long()
            if (context < 0).any():
                raise DataError(
                    f"{source}: 'context' row {int((context < 0).nonzero()[0])} is a negative label"
                )
        else:
            raise DataError(f"{source}: 'context' must be integer class labels [N] or float vectors [N, d]")
    for name, array in arrays.items():
        bad = ~torch.isfinite(array.reshape(len(array), -1).float()).all(1)
        if bad.any():
            raise DataError(f"{source}: field '{name}' row {int(bad.nonzero()[0])} has a non-finite value")
    return arrays["chosen"], arrays["rejected"], arrays.get("context")


class PreferenceFlow:
    """A flow that improves samples of a frozen black-box generator: fit on pairs, then `improve` samples."""

    def __init__(self, config: Config | None = None):
        self.config = config or Config()
        self.field: nn.Module | None = None
        self.meta: dict = {}  # sample shape and context kind, needed to rebuild the field
        self.history: list[dict] = []

    def build(self, chosen, context=None) -> nn.Module:
        """A fresh field for samples shaped like `chosen` [N, ...] and this kind of context."""
        kind = "none" if context is None else ("class" if context.dim() == 1 else "vector")
        num_classes = (self.config.model.num_classes or int(context.max()) + 1) if kind == "class" else 0
        self.meta = {"shape": list(chosen.shape[1:]), "context_kind": kind, "num_classes": num_classes,
                     "context_dim": int(context.shape[1]) if kind == "vector" else 0}  # fmt: skip
        if kind == "class" and int(context.max()) >= num_classes:
            raise DataError(f"context label {int(context.max())} >= model.num_classes {num_classes}")
        return build_field(self.config.model, **self.meta)

    def fit(self, chosen, rejected, context=None, output_dir: str | None = None, evaluate_fn=None):
        """Learn the field from rejected (t=0) to chosen (t=1). `output_dir` writes checkpoints and metrics."""
        chosen, rejected, context = check_pairs(chosen, rejected, context)
        self.field = self.build(chosen, context)
        data = {"chosen": chosen, "rejected": rejected} | (
            {"context": context} if context is not None else {}
        )
        cfg, train_cfg = self.config, replace(self.config.train, output_dir=output_dir or "")
        result = fit(
            self.field,
            range(len(chosen)),
            lambda idx: {k: v[idx] for k, v in data.items()},
            lambda field, batch: flow_step(field, batch, cfg.flow.sigma, cfg.flow.coupling),
            train_cfg,
            evaluate_fn=evaluate_fn,
            desc="pfm",
        )
        self.field, self.history = result.model.eval(), result.history
        return self

    @torch.no_grad()
    def improve(self, samples, context=None, steps: int | None = None, method: str | None = None, rounds=1):
        """Push samples along the flow (t: 0 -> 1); `rounds` > 1 re-applies the same flow (iterative `reapply`)."""
        if self.field is None:
            raise RuntimeError("this PreferenceFlow is not fitted: call fit() or PreferenceFlow.load()")
        samples = torch.as_tensor(samples, dtype=torch.float32)
        if list(samples.shape[1:]) != self.meta["shape"]:
            raise ValueError(
                f"samples have shape {list(samples.shape[1:])}, the flow was fit on {self.meta['shape']}"
            )
        if context is not None:
            context = torch.as_tensor(context)
            context = context.long() if not context.dtype.is_floating_point else context.float().flatten(1)
            if len(context) != len(samples):
                raise ValueError(f"got {len(samples)} samples but {len(context)} contexts")
            if (
                self.meta["context_kind"] == "class"
                and (context < 0).any() | (context >= self.meta["num_classes"]).any()
            ):
                raise ValueError(f"class context out of range [0, {self.meta['num_classes']})")
        cfg = self.config.flow
        for _ in range(rounds):
            samples, _ = integrate(self.field, samples, context, method or cfg.solver, steps or cfg.solver_steps,
                                   cfg.rtol, cfg.atol)  # fmt: skip
        return samples

    def save(self, path) -> Path:
        """A directory with `flow.safetensors` (weights) and `flow.json` (config + sample/context description)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.field.state_dict().items()}, path / "flow.safetensors")
        (path / "flow.json").write_text(
            json.dumps({"config": asdict(self.config), "meta": self.meta}, indent=2)
        )
        return path

    @classmethod
    def load(cls, path) -> PreferenceFlow:
        path = Path(path)
        saved = json.loads((path / "flow.json").read_text())
        flow = cls(build(Config, saved["config"]))
        flow.meta = saved["meta"]
        flow.field = build_field(flow.config.model, **flow.meta)
        flow.field.load_state_dict(load_file(path / "flow.safetensors"))
        flow.field.eval()
        return flow


# ---------------------------------------------------------------- iterative PFM with a judge


def improve_with(flows, samples, context=None):
    """Apply a stack of flows in order (the policy after `recollect` rounds)."""
    for flow in flows:
        samples = flow.improve(samples, context)
    return samples


def collect_pairs(generator: Callable, judge: Callable, contexts, pairwise: bool = False):
    """Two samples per context from `generator(contexts)` (an int n means unconditional: `generator(n)`),
    labelled by `judge(samples, context) -> scores` (higher wins) or, if `pairwise`, by
    `judge(a, b, context) -> P(a preferred)`. Returns (chosen, rejected, context)."""
    context = None if isinstance(contexts, int) else contexts
    a, b = generator(contexts), generator(contexts)
    a_wins = judge(a, b, context) > 0.5 if pairwise else judge(a, context) >= judge(b, context)
    a_wins = torch.as_tensor(a_wins).reshape(-1, *[1] * (a.dim() - 1))
    return torch.where(a_wins, a, b), torch.where(a_wins, b, a), context


def recollect(
    config: Config, generator: Callable, judge: Callable, contexts, rounds: int = 2, pairwise=False
):
    """Iterative PFM, re-collect mode: round r labels pairs drawn from the policy improved by rounds < r and
    fits a new flow on top. Returns the list of flows; sample with `improve_with(flows, generator(c), c)`."""
    flows: list[PreferenceFlow] = []
    for _ in range(rounds):
        policy = lambda c, fs=list(flows): improve_with(fs, generator(c), None if isinstance(c, int) else c)  # noqa: E731
        chosen, rejected, context = collect_pairs(policy, judge, contexts, pairwise)
        flows.append(PreferenceFlow(config).fit(chosen, rejected, context))
    return flows


# ---------------------------------------------------------------- recipe: `prefalign train` with method: pfm


def load_pairs(path) -> dict[str, torch.Tensor]:
    """Arrays `chosen`, `rejected` and optional `context` from `.npz` or `.safetensors`, validated."""
    path = Path(path)
    arrays = read_arrays(path, "pair data file")
    for name in ("chosen", "rejected"):
        if name not in arrays:
            raise DataError(f"{path}: missing array '{name}' (found: {', '.join(arrays) or 'none'})")
    chosen, rejected, context = check_pairs(
        arrays["chosen"], arrays["rejected"], arrays.get("context"), str(path)
    )
    return {"chosen": chosen, "rejected": rejected} | ({"context": context} if context is not None else {})


def setup(cfg: Config, ctx, **_) -> Job:
    """`prefalign train` with method: pfm — fit a flow on user pair data (a held-out part scores eval/loss)."""
    data = load_pairs(cfg.data.train)
    n = len(data["chosen"])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.train.seed))
    n_val = int(cfg.data.eval_fraction * n) if n > 1 else 0
    val = {k: v[order[:n_val]] for k, v in data.items()}
    rows = {k: v[order[n_val:]] for k, v in data.items()}
    chosen, rejected, context = check_pairs(rows["chosen"], rows["rejected"], rows.get("context"))
    flow = PreferenceFlow(cfg)
    flow.field = flow.build(chosen, context)
    train_data = {"chosen": chosen, "rejected": rejected} | (
        {"context": context} if context is not None else {}
    )

    def evaluate(field):  # held-out flow-matching loss at fixed t and noise
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return {"loss": flow_step(field, val, cfg.flow.sigma, cfg.flow.coupling)[0]}

    def save(field, path):
        flow.field = field
        flow.save(path)

    return Job(
        model=flow.field,
        dataset=range(len(chosen)),
        collate=lambda idx: {k: v[idx] for k, v in train_data.items()},
        step=lambda field, batch: flow_step(field, batch, cfg.flow.sigma, cfg.flow.coupling),
        evaluate=evaluate if n_val else None,
        save=save,
        summarize=lambda history: {"pairs": n - n_val, "val_pairs": n_val},
        desc="pfm",
    )


def evaluate_run(run_dir: Path, cfg: Config) -> dict:
    """`prefalign eval RUN_DIR`: the flow-matching loss of `final/` on the run's held-out pairs (and on all of
    its pairs when none were held out), and how far the flow moves rejected samples towards chosen ones."""
    flow = PreferenceFlow.load(Path(run_dir) / "final")
    data = load_pairs(cfg.data.train)
    n = len(data["chosen"])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.train.seed))
    n_val = int(cfg.data.eval_fraction * n) if n > 1 else 0
    rows = order[:n_val] if n_val else order
    part = {k: v[rows] for k, v in data.items()}
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        loss = float(flow_step(flow.field, part, cfg.flow.sigma, cfg.flow.coupling)[0])
        moved = flow.improve(part["rejected"], part.get("context"))
    before = (part["rejected"] - part["chosen"]).flatten(1).norm(dim=1).mean()
    after = (moved - part["chosen"]).flatten(1).norm(dim=1).mean()
    return {"eval/loss": loss, "eval/pairs": len(rows), "eval/distance_to_chosen_before": float(before),
            "eval/distance_to_chosen_after": float(after)}  # fmt: skip
