"""EM-DPO: preferences from annotators of K hidden types -> K policies (one LoRA adapter per type).

Chidambaram et al. (arXiv 2405.15065). Every annotator u has one hidden type; type k has prior η_k and a
policy π_k whose DPO implicit reward r_k = β·(log π_k − log π_ref) ranks responses by Plackett–Luce:

    E-step   log γ_{u,k} = log η_k + Σ_{j ∈ D_u} log P_PL(ranking_j | r_k) − log Σ_k' (same),   η_k = mean_u γ_{u,k}
    M-step   for each k: minimize Σ_j γ_{u(j),k} · L_PL(π_k; j)          ("weighted": K passes over the data)
             or sample z_u ~ γ_u and train π_{z_u} on u's records        ("stochastic": ≈ one DPO pass)

One base model holds K adapters (`peft`), the reference is the base with adapters disabled, so K types
cost one model plus K small adapters. The observed-data log-likelihood Σ_u log Σ_k η_k Π_j P_k(j) is
logged every iteration: exact EM never decreases it (tested on a tabular case in tests/test_em_dpo.py);
with a few gradient steps per M-step (generalized EM) it usually, not always, increases.

Reconstructed details (not fixed by the paper; named, switchable options):
- `em.holdout`: the E-step scores each annotator on the half of its records (alternating halves) that
  this iteration's M-step did not train on, so a policy cannot just "explain its own annotators".
  Annotators with a single record are then scored on that record (in-sample) and trained every iteration.
- `em.init: kmeans`: annotators are clustered by the direction of their preferences: each ranking's score
  vector Σ_t (φ(y_t) − mean of φ over the candidates remaining at step t) with φ = bag of words of the
  response, summed per annotator, L2-normalized, k-means (≈ clustering on cosine agreement).
  `em.init: whitened` projects the (unnormalized) directions on the top K − 1 generalized eigenvectors of
  (their covariance, their covariance under uniformly random rankings) before k-means.
- M-steps warm-start the adapters from the previous iteration (the research code retrains from SFT).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from prefalign.core.checkpoint import trainable_state
from prefalign.core.config import build, build_loss, load_yaml
from prefalign.core.data import DataConfig, load_records
from prefalign.core.encode import apply_chat_template, encode_data, fit_lengths
from prefalign.core.errors import ConfigError
from prefalign.core.logprobs import collate, sequence_logps
from prefalign.core.metrics import preference_metrics
from prefalign.core.models import (
    LoraSettings,
    ModelConfig,
    disable_dropout,
    load_base_model,
    load_tokenizer,
    pad_token_id,
)
from prefalign.core.reference import precompute_reference_logps
from prefalign.core.train import FitResult, Job, TrainConfig, fit
from prefalign.losses.lm import plackett_luce_loss, ranking_log_likelihood
from prefalign.methods.em_dpo.init import (  # noqa: F401  (re-exported: part of em_dpo's API)
    annotator_index,
    initial_gamma,
    preference_directions,
    record_halves,
    whitened_directions,
)
from prefalign.methods.em_dpo.types import (  # noqa: F401
    TypeCopies,
    activate,
    add_type_adapters,
    load_adapters,
    type_policies,
)

logger = logging.getLogger(__name__)


@dataclass
class EMConfig:
    n_types: int = 2
    max_iterations: int = 4
    m_step: Literal["stochastic", "weighted"] = "stochastic"
    init: Literal["kmeans", "whitened", "dirichlet", "labels"] = "kmeans"
    init_labels: str | None = None  # JSON {annotator: type index} for init: labels
    init_smoothing: float = 0.1  # kmeans/labels start from γ = (1 − s)·one-hot + s/K
    dirichlet_alpha: float = 1.0
    adapter: Literal["lora", "full"] = (
        "lora"  # per-type policy: a LoRA adapter, or a full copy (small models)
    )
    holdout: bool = False  # E-step on the alternate half of each annotator's records (see module doc)
    true_types: str | None = None  # JSON {annotator: true type}: logs the adjusted Rand index

    def validate(self):
        if self.n_types < 1 or self.max_iterations < 1:
            raise ConfigError(
                f"config keys 'em.n_types' and 'em.max_iterations' must be >= 1, got "
                f"{self.n_types} and {self.max_iterations}"
            )
        if self.init == "labels" and not self.init_labels:
            raise ConfigError("config key 'em.init' is 'labels' but 'em.init_labels' names no file")


LOSSES = {"plackett_luce": plackett_luce_loss}
RENAMES = {
    "beta": "loss.beta",
    "eval_batch_size": "train.eval_batch_size",
    "em.iterations": "em.max_iterations",
}


@dataclass
class LossConfig:
    """`loss:` of the M-step: γ-weighted listwise DPO (Plackett–Luce), which is DPO on pairs."""

    name: str = "plackett_luce"
    beta: float = 0.1  # β of every type's implicit reward r_k = β·log(π_k / π_ref)

    def validate(self):
        build_loss(self, LOSSES)
        if not self.beta > 0:
            raise ConfigError(f"config key 'loss.beta' must be > 0, got {self.beta}")


@dataclass
class Config:
    method: str = "em_dpo"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(lora=LoraSettings(enabled=True)))
    data: DataConfig = field(default_factory=lambda: DataConfig(eval_fraction=0.0))
    loss: LossConfig = field(default_factory=LossConfig)
    em: EMConfig = field(default_factory=EMConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(output_dir="runs/em_dpo", epochs=1.0, eval_batch_size=64)
    )


@dataclass
class EMResult:
    model: object  # PeftModel with adapters type0..type{K-1}
    tokenizer: object
    adapters: list[str]
    annotators: list[str]
    gamma: np.ndarray  # [U, K]
    eta: np.ndarray  # [K]
    history: list[dict]


# ---------------------------------------------------------------- the E-step (pure tensor math)


def e_step(record_loglik, annotator_index, n_annotators: int, eta, record_mask=None):
    """-> (γ [U, K], new η [K], observed log-likelihood) from per-record log P_k(j) [N, K], in log space.

    record_mask [N] bool keeps only the records scored this iteration (held-out half)."""
    if record_mask is not None:
        record_loglik = torch.where(record_mask[:, None], record_loglik, 0.0)
    per_annotator = torch.zeros(n_annotators, record_loglik.shape[1], dtype=record_loglik.dtype)
    per_annotator.index_add_(0, annotator_index, record_loglik)
    joint = torch.as_tensor(eta, dtype=record_loglik.dtype).log() + per_annotator
    total = joint.logsumexp(-1)
    gamma = (joint - total[:, None]).exp()
    return gamma, gamma.mean(0), float(total.sum())


def gamma_entropy(gamma) -> float:
    """Mean over annotators of −Σ_k γ log γ (0: certain assignments, log K: uninformed)."""
    gamma = torch.as_tensor(gamma)
    return float(-(gamma * gamma.clamp(min=1e-30).log()).sum(-1).mean())


def record_logliks(rewards, ranking, candidate_mask) -> torch.Tensor:
    """[N, K] Plackett–Luce log-likelihood of each record under each type's rewards [N, n, K]."""
    return torch.stack(
        [ranking_log_likelihood(rewards[..., k], ranking, candidate_mask) for k in range(rewards.shape[-1])],
        -1,
    )


def type_rewards(model, encoded, adapters, beta, pad_token_id, batch_size, record_mask=None) -> torch.Tensor:
    """[N, n, K] implicit rewards β·(log π_k − log π_ref) of every candidate (reference already in `encoded`).

    record_mask [N] bool: score only these records (the E-step's held-out half; the rest stay 0), which
    halves the E-step's K no-grad passes under `em.holdout`."""
    n = max(len(e.response_ids) for e in encoded)
    keep = list(range(len(encoded))) if record_mask is None else torch.nonzero(record_mask).flatten().tolist()
    out = torch.zeros(len(encoded), n, len(adapters))
    if not keep:
        return out
    reference = _padded([encoded[i].reference_logps for i in keep], n)
    for k, name in enumerate(adapters):
        activate(model, name)
        copies = [dataclasses.replace(encoded[i], reference_logps=None) for i in keep]
        logps = precompute_reference_logps(
            model, copies, batch_size=batch_size, pad_token_id=pad_token_id, desc=f"E-step {name}"
        )
        out[keep, :, k] = beta * (_padded(logps, n) - reference)
    return out


def _padded(rows, n) -> torch.Tensor:
    return torch.tensor([list(r) + [0.0] * (n - len(r)) for r in rows], dtype=torch.float32)


# ---------------------------------------------------------------- the M-step


def m_step_items(encoded, index, gamma, mode: str, rng, record_mask=None) -> list:
    """(record, per-type weights [K]) items: γ_u (weighted) or a one-hot draw z_u ~ γ_u (stochastic)."""
    gamma = np.asarray(gamma, dtype=float)
    if mode == "stochastic":
        draws = np.array([rng.choice(len(g), p=g / g.sum()) for g in gamma])
        gamma = np.eye(gamma.shape[1])[draws]
    elif mode != "weighted":
        raise ConfigError(f"config key 'em.m_step' must be 'stochastic' or 'weighted', got {mode!r}")
    keep = range(len(encoded)) if record_mask is None else torch.nonzero(record_mask).flatten().tolist()
    return [(encoded[i], gamma[index[i]] * encoded[i].weight) for i in keep]


def make_collate(pad_token_id: int):
    def collate_by_type(items):
        """One sub-batch per type with a positive weight (a forward per adapter present)."""
        weights = np.stack([w for _, w in items])
        groups = []
        for k in np.flatnonzero(weights.sum(0) > 0):
            rows = np.flatnonzero(weights[:, k] > 0)
            group = collate([items[i][0] for i in rows], pad_token_id)
            group["type_weight"] = torch.tensor(weights[rows, k], dtype=torch.float32)
            groups.append({"adapter": int(k), "batch": group})
        return {"groups": groups}

    return collate_by_type


def make_step(adapters, beta: float):
    """step_fn for `core.train.fit`: γ-weighted listwise DPO, summed over the types present in the batch."""

    def step(model, batch):
        parts = []
        for group in batch["groups"]:
            g = group["batch"]
            activate(model, adapters[group["adapter"]])
            logps, _ = sequence_logps(model, g)
            present = g["candidate_index"] >= 0
            losses, rewards = plackett_luce_loss(logps, g["reference_logps"], g["ranking"], beta, present)
            parts.append((losses, g["type_weight"], rewards, logps, g["ranking"], present))
        losses, weight, rewards, logps, ranking, present = (_cat_padded(column) for column in zip(*parts))
        return preference_metrics(losses, weight, rewards, logps, ranking, present)

    return step


def _cat_padded(tensors) -> torch.Tensor:
    """Concatenate per-type sub-batches along records; [B_k, n_k] parts are padded to the largest n."""
    if tensors[0].dim() == 1:
        return torch.cat(tensors)
    n = max(t.shape[1] for t in tensors)
    fill = {torch.bool: False, torch.long: -1}.get(tensors[0].dtype, 0.0)
    return torch.cat([torch.nn.functional.pad(t, (0, n - t.shape[1]), value=fill) for t in tensors])


# ---------------------------------------------------------------- the EM loop


def adjusted_rand(true_types: dict, names, gamma) -> float | None:
    from sklearn.metrics import adjusted_rand_score  # scikit-learn: only for this diagnostic

    known = [i for i, u in enumerate(names) if u in true_types]
    if not known:
        return None
    return float(adjusted_rand_score([str(true_types[names[i]]) for i in known], np.argmax(gamma[known], 1)))


class EMState:
    """What an EM-DPO run keeps between iterations, saved atomically after each one to RUN/em/iter-N/
    (every type's trainable weights, γ, η, the log), so a killed run resumes at the last finished iteration;
    an iteration's M-step checkpoints itself like any `fit` (RUN/m_steps/iter-N/)."""

    def __init__(self, run_dir: Path | None):
        self.root = Path(run_dir) / "em" if run_dir else None

    def latest(self) -> Path | None:
        if self.root is None or not self.root.is_dir():
            return None
        done = [p for p in self.root.glob("iter-*") if (p / "state.json").is_file()]
        return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None

    def save(self, iteration: int, model, gamma, eta, history) -> None:
        if self.root is None:
            return
        final, tmp = self.root / f"iter-{iteration}", self.root / f".tmp-iter-{iteration}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        save_file({"gamma": torch.as_tensor(gamma), "eta": torch.as_tensor(eta)}, tmp / "gamma.safetensors")
        (tmp / "state.json").write_text(json.dumps({"iteration": iteration, "history": history}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self.root.glob("iter-*"):  # the newest is enough to resume
            if old != final:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, model):
        weights = load_file(path / "trainable.safetensors")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
        arrays = load_file(path / "gamma.safetensors")
        state = json.loads((path / "state.json").read_text())
        return state["iteration"], arrays["gamma"].numpy(), arrays["eta"].numpy(), state["history"]


def run_em(cfg: Config, records, base_model, tokenizer, *, true_types=None, init_labels=None,
           log_fn=None, accelerator=None, run_dir=None) -> EMResult:  # fmt: skip
    """EM over `records` (with annotator ids) starting from `base_model`; see the module docstring.
    With `run_dir`, every iteration is checkpointed and a rerun continues where a killed one stopped."""
    names, index = annotator_index(records)
    K, em = cfg.em.n_types, cfg.em
    if K > len(names):
        raise ConfigError(f"config key 'em.n_types' = {K} exceeds the number of annotators ({len(names)})")
    apply_chat_template(tokenizer, cfg.data)
    encoded = encode_data(tokenizer, records, cfg.data, "data.train", fit_lengths(cfg.data, base_model))
    if len(encoded) < len(records):  # records identical after truncation dropped (data.on_bad_row: skip)
        records = [records[i] for i in encoded.kept]
        names, index = annotator_index(records)
    pad = pad_token_id(tokenizer)
    model, adapters = type_policies(base_model, em, cfg.model.lora, cfg.train.seed)
    if accelerator is not None:
        model.to(accelerator.device)
    with model.disable_adapter():
        precompute_reference_logps(
            model,
            encoded,
            batch_size=cfg.train.eval_batch_size,
            pad_token_id=pad,
            cache_dir=str(Path(run_dir) / "reference_cache") if run_dir else None,
        )
    n = max(len(e.response_ids) for e in encoded)
    ranking = torch.tensor([e.ranking + [-1] * (n - len(e.ranking)) for e in encoded])
    present = torch.tensor([[j < len(e.response_ids) for j in range(n)] for e in encoded])
    halves = record_halves(index)
    if em.holdout and (halves < 0).any():
        logger.warning(
            "em.holdout: %d annotators have a single record; they are scored in-sample",
            len(set(index[halves < 0].tolist())),
        )
    state = EMState(run_dir)
    if not cfg.train.resume and state.root is not None:  # starting over: an old iteration must not win
        shutil.rmtree(state.root, ignore_errors=True)
    start, history = 0, []
    gamma = initial_gamma(em, records, index, names, cfg.train.seed, init_labels)
    eta = gamma.mean(0)
    if (latest := state.latest()) is not None:
        activate(model, adapters[0])
        start, gamma, eta, history = state.load(latest, model)
        logger.warning("resumed EM-DPO from %s (iteration %d)", latest, start)
    for t in range(start, em.max_iterations):
        fit_half = (
            torch.ones(len(encoded), dtype=torch.bool) if not em.holdout else (halves == t % 2) | (halves < 0)
        )
        score_half = None if not em.holdout else (halves == (t + 1) % 2) | (halves < 0)
        rng = np.random.default_rng([cfg.train.seed, t])  # a function of (seed, iteration): resume is exact
        items = m_step_items(encoded, index, gamma, em.m_step, rng, fit_half)
        m_dir = str(Path(run_dir) / "m_steps" / f"iter-{t + 1}") if run_dir else ""
        train_cfg = dataclasses.replace(cfg.train, output_dir=m_dir, seed=cfg.train.seed + t)
        # fit() optimizes what requires grad when it starts; peft's disable_adapter() (the reference pass)
        # leaves only the active adapter trainable, which silently froze type1.. in the first M-step
        activate(model, adapters[0])
        fitted = fit(
            model,
            items,
            make_collate(pad),
            make_step(adapters, cfg.loss.beta),
            train_cfg,
            accelerator=accelerator,
            desc=f"EM {t + 1}/{em.max_iterations} M-step",
        )
        model = fitted.model
        rewards = type_rewards(
            model, encoded, adapters, cfg.loss.beta, pad, cfg.train.eval_batch_size, score_half
        )
        loglik = record_logliks(rewards, ranking, present)
        gamma_t, eta_t, total = e_step(loglik, index, len(names), torch.tensor(eta), score_half)
        gamma, eta = gamma_t.numpy(), eta_t.numpy()
        losses = [h["loss"] for h in fitted.history if "loss" in h]
        entry = {
            "step": t + 1,
            "iteration": t + 1,
            "em/log_likelihood": total,
            "em/type_weights": eta.tolist(),
            "em/gamma_entropy": gamma_entropy(gamma),
            "loss": float(np.mean(losses)) if losses else None,
            "em/m_step_records": len(items),
        }
        if true_types is not None:
            entry["em/ari"] = adjusted_rand(true_types, names, gamma)
        history.append(entry)
        if log_fn is not None:
            log_fn(entry)
        activate(model, adapters[0])
        state.save(t + 1, model, gamma, eta, history)
    return EMResult(model, tokenizer, adapters, names, gamma, eta, history)


# ---------------------------------------------------------------- run directory


def save_result(run_dir, result: EMResult, records) -> Path:
    """adapters/type*/ (peft), tokenizer/, gamma.csv, eta.json, prompts.json (for `aggregate_run`)."""
    run_dir = Path(run_dir)
    result.model.save_pretrained(
        run_dir / "adapters", selected_adapters=result.adapters, safe_serialization=True
    )
    result.tokenizer.save_pretrained(run_dir / "tokenizer")
    lines = ["annotator," + ",".join(result.adapters)]
    lines += [
        f"{json.dumps(u)}," + ",".join(f"{g:.6g}" for g in row)
        for u, row in zip(result.annotators, result.gamma)
    ]
    (run_dir / "gamma.csv").write_text("\n".join(lines) + "\n")
    (run_dir / "eta.json").write_text(
        json.dumps(dict(zip(result.adapters, result.eta.tolist())), indent=2) + "\n"
    )
    prompts = list(dict.fromkeys(json.dumps(r.prompt) for r in records))[:2000]
    (run_dir / "prompts.json").write_text(json.dumps([json.loads(p) for p in prompts]) + "\n")
    return run_dir


def setup(
    cfg: Config, ctx, *, records=None, model=None, tokenizer=None, true_types=None, init_labels=None, **_
):
    """The run as a `Job` with its own loop (EM iterations, each M-step a checkpointed `fit`)."""
    if records is None:
        records, _ = load_records(dataclasses.replace(cfg.data, eval_fraction=0.0), cfg.train.seed)
    if model is None:
        model, tokenizer = load_base_model(cfg.model), load_tokenizer(cfg.model)
    elif not cfg.model.dropout:
        disable_dropout(model)
    if true_types is None and cfg.em.true_types:
        true_types = json.loads(Path(cfg.em.true_types).read_text())
    annotator_index(records)  # every record needs an annotator: fail before any model work
    done: dict = {}

    def train(ctx) -> FitResult:
        metrics = ctx.run_dir / "metrics.jsonl"

        def log(entry):
            with open(metrics, "a") as fh:
                fh.write(json.dumps(entry) + "\n")

        if EMState(ctx.run_dir).latest() is None or not cfg.train.resume:
            metrics.unlink(missing_ok=True)
        result = run_em(cfg, records, model, tokenizer, true_types=true_types, init_labels=init_labels,
                        log_fn=log, accelerator=ctx.accelerator, run_dir=ctx.run_dir)  # fmt: skip
        done["result"] = result
        return FitResult(result.model, ctx.run_dir, result.history, ctx.accelerator)

    def save(trained, path: Path) -> None:
        save_result(path, done["result"], records)

    def summarize(history) -> dict:
        result = done["result"]
        return {
            "type_weights": result.eta.tolist(),
            "annotators": len(result.annotators),
            **(history[-1] if history else {}),
        }

    return Job(model=model, train=train, save=save, summarize=summarize, desc="em_dpo")


def load_run(run_dir, cfg: Config | None = None):
    """(cfg, model with every type adapter, tokenizer, adapter names) of a finished EM-DPO run."""
    run_dir = Path(run_dir)
    final = run_dir / "final"
    if not (final / "adapters").is_dir():
        raise ConfigError(f"{run_dir} is not a finished EM-DPO run (no final/adapters/)")
    cfg = cfg or build(Config, {k: v for k, v in load_yaml(run_dir / "config.yaml").items()})
    adapters = list(json.loads((final / "eta.json").read_text()))
    model = load_adapters(load_base_model(cfg.model), final / "adapters", adapters)
    return cfg, model.eval(), AutoTokenizer.from_pretrained(final / "tokenizer"), adapters


def evaluate_run(run_dir: Path, cfg: Config) -> dict:
    """`prefalign eval RUN_DIR`: the recovered mixture (η), γ's entropy, and the final log-likelihood."""
    _, _, _, adapters = load_run(run_dir, cfg)
    eta = json.loads((Path(run_dir) / "final" / "eta.json").read_text())
    lines = [ln for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    last = json.loads(lines[-1]) if lines else {}
    out = {f"em/type_weight/{name}": eta[name] for name in adapters}
    out.update({k: v for k, v in last.items() if k.startswith("em/") and not isinstance(v, list)})
    return out
