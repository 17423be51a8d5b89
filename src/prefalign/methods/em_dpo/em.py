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
- `em.folds` (cross-fitting): annotators are split into F folds and every fold f has its own K policies,
  trained on the OTHER folds' annotators; the E-step scores fold f's annotators with fold f's policies, so
  the logged log-likelihood is held out and no policy can memorize the annotators it assigns. After EM, the
  final policies type0..type{K-1} start from fold 0's and get one M-step on every annotator.
  `em.in_sample_loglik` also logs the log-likelihood under policies that did train on each annotator: the
  gap between the two is the memorization.
- Stopping: EM stops at a log-likelihood plateau (the criterion above gains less than `em.tolerance` per
  annotator; `em.holdout` compares iterations two apart, which score the same half), or after
  `em.max_iterations`; `em.restarts` runs EM from that many starts (init seeds seed, seed + 1, ...) and keeps
  the one with the highest final log-likelihood.
- M-steps warm-start the adapters from the previous iteration (the research code retrains from SFT).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from transformers import AutoTokenizer

from prefalign.core import extras
from prefalign.core.checkpoint import trainable_state
from prefalign.core.config import build, build_loss, load_yaml
from prefalign.core.data import DataConfig, load_records
from prefalign.core.encode import apply_chat_template, fit_lengths
from prefalign.core.encode_arrow import encode_data
from prefalign.core.errors import ConfigError
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
from prefalign.losses.lm import plackett_luce_loss
from prefalign.methods.em_dpo.init import (  # noqa: F401  (re-exported: part of em_dpo's API)
    annotator_index,
    initial_gamma,
    preference_directions,
    record_halves,
    whitened_directions,
)
from prefalign.methods.em_dpo.state import EMState
from prefalign.methods.em_dpo.steps import (  # noqa: F401  (re-exported)
    adjusted_rand,
    annotator_folds,
    cross_fit_items,
    e_step,
    gamma_entropy,
    m_step_items,
    make_collate,
    make_step,
    plateaued,
    record_logliks,
    type_rewards,
)
from prefalign.methods.em_dpo.types import (  # noqa: F401
    TypeCopies,
    activate,
    add_type_adapters,
    copy_type,
    load_adapters,
    reset_types,
    type_policies,
)

logger = logging.getLogger(__name__)


@dataclass
class EMConfig:
    n_types: int = 2  # K latent annotator types (one policy each)
    max_iterations: int = 4  # at most this many EM iterations (E-step + M-step); see tolerance
    tolerance: float | None = 1e-3  # plateau: stop once an iteration gains < this per annotator; None: never
    restarts: int = 1  # EM runs from starts seeded seed, seed + 1, ...: the highest final log-likelihood wins
    folds: int = 1  # >= 2: cross-fitting by annotator folds (held-out E-step; see the module docstring)
    in_sample_loglik: bool = False  # with folds: also log the log-likelihood under policies trained on each
    m_step: Literal["stochastic", "weighted"] = "stochastic"  # records drawn by γ, or every record γ-weighted
    init: Literal["kmeans", "whitened", "dirichlet", "labels"] = "kmeans"  # how the first γ is chosen
    init_labels: str | None = None  # JSON {annotator: type index} for init: labels
    init_smoothing: float = 0.1  # kmeans/labels start from γ = (1 − s)·one-hot + s/K
    dirichlet_alpha: float = 1.0  # init dirichlet: concentration of the random γ
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
        if self.restarts < 1 or self.folds < 1 or (self.tolerance is not None and not self.tolerance >= 0):
            raise ConfigError(
                f"config keys 'em.restarts' and 'em.folds' must be >= 1 and 'em.tolerance' >= 0 (or null), got "
                f"{self.restarts}, {self.folds} and {self.tolerance}"
            )
        if self.folds > 1 and self.holdout:
            raise ConfigError("config keys 'em.folds' > 1 and 'em.holdout' both hold out data: choose one")
        if self.init in ("kmeans", "whitened"):
            extras.require("em", f"em.init: {self.init}")
        if self.true_types:
            extras.require("em", "em.true_types (the adjusted Rand index)")
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

    name: str = "plackett_luce"  # the only loss: plackett_luce
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
    history: list[dict]  # per iteration, of the restart kept
    restarts: list[float] = field(default_factory=list)  # final log-likelihood of every restart


# ---------------------------------------------------------------- the EM loop


@dataclass
class _Data:
    """What every iteration of every restart reads: encoded records (with reference log-probs), annotators."""

    encoded: list
    index: torch.Tensor  # [N] annotator of each record
    names: list[str]
    ranking: torch.Tensor
    present: torch.Tensor
    halves: torch.Tensor  # em.holdout's record halves
    record_fold: torch.Tensor | None  # em.folds: the fold of each record's annotator


def _e_step(cfg, model, groups, data: _Data, eta, pad, score, shift: int = 0):
    """(γ, η, log-likelihood): fold g's records scored by fold (g + shift)'s policies (shift 0: held out)."""
    F = len(groups)
    if data.record_fold is None:
        rewards = type_rewards(
            model, data.encoded, groups[0], cfg.loss.beta, pad, cfg.train.eval_batch_size, score
        )
    else:
        rewards = sum(
            type_rewards(
                model,
                data.encoded,
                groups[(g + shift) % F],
                cfg.loss.beta,
                pad,
                cfg.train.eval_batch_size,
                data.record_fold == g,
            )  # fmt: skip
            for g in range(F)
        )
    loglik = record_logliks(rewards, data.ranking, data.present)
    gamma, eta, total = e_step(loglik, data.index, len(data.names), torch.tensor(eta), score)
    return gamma.numpy(), eta.numpy(), total


def _run_restart(cfg, r, model, groups, data, pad, init, *, true_types, log_fn, accelerator, run_dir):
    """One EM run (restart r) to its plateau or em.max_iterations -> (γ, η, history, weights in memory or None
    when this restart finished in an earlier process and its weights are on disk)."""
    em, state, flat = cfg.em, EMState(run_dir, r), [name for group in groups for name in group]
    start, history, done = 0, [], False
    if (latest := state.latest()) is not None:
        activate(model, flat[0])
        start, gamma, eta, history, done = state.load(latest, model)
        logger.warning("resumed EM-DPO from %s (iteration %d)", latest, start)
        if done:
            return gamma, eta, history, None
    else:
        if r:
            reset_types(model, flat, cfg.train.seed + r)
        gamma = init(cfg.train.seed + r)
        eta = gamma.mean(0)
    U = len(data.names)
    for t in range(start, em.max_iterations):
        fit_half = (
            torch.ones(len(data.encoded), dtype=torch.bool)
            if not em.holdout
            else (data.halves == t % 2) | (data.halves < 0)
        )
        score = None if not em.holdout else (data.halves == (t + 1) % 2) | (data.halves < 0)
        rng = np.random.default_rng([cfg.train.seed + r, t])  # a function of (seed, restart, iteration)
        items = m_step_items(data.encoded, data.index, gamma, em.m_step, rng, fit_half)
        if data.record_fold is not None:
            items = cross_fit_items(items, data.record_fold, len(groups))
        m_dir = str(state.m_steps / f"iter-{t + 1}") if run_dir else ""
        train_cfg = dataclasses.replace(cfg.train, output_dir=m_dir, seed=cfg.train.seed + r * 1000 + t)
        # fit() optimizes what requires grad when it starts; peft's disable_adapter() (the reference pass)
        # leaves only the active adapter trainable, which silently froze type1.. in the first M-step
        activate(model, flat[0])
        fitted = fit(model, items, make_collate(pad), make_step(flat, cfg.loss.beta), train_cfg,
                     accelerator=accelerator, desc=f"EM {t + 1}/{em.max_iterations} M-step")  # fmt: skip
        model = fitted.model
        gamma, eta, total = _e_step(cfg, model, groups, data, eta, pad, score)
        losses = [h["loss"] for h in fitted.history if "loss" in h]
        entry = {
            "step": r * em.max_iterations + t + 1,
            "iteration": t + 1,
            "restart": r,
            "em/log_likelihood": total,
            "em/log_likelihood_kind": "held-out" if (em.holdout or em.folds > 1) else "in-sample",
            "em/type_weights": eta.tolist(),
            "em/gamma_entropy": gamma_entropy(gamma),
            "loss": float(np.mean(losses)) if losses else None,
            "em/m_step_records": len(items),
        }
        if em.in_sample_loglik and data.record_fold is not None:
            entry["em/log_likelihood_in_sample"] = _e_step(cfg, model, groups, data, eta, pad, None, shift=1)[
                2
            ]
        if true_types is not None:
            entry["em/ari"] = adjusted_rand(true_types, data.names, gamma)
        lls = [h["em/log_likelihood"] for h in history]
        previous = (lls[-2] if len(lls) >= 2 else None) if em.holdout else (lls[-1] if lls else None)
        done = t + 1 == em.max_iterations or (
            em.tolerance is not None and plateaued(previous, total, U, em.tolerance)
        )
        entry["em/plateau"] = done and t + 1 < em.max_iterations
        history.append(entry)
        if log_fn is not None:
            log_fn(entry)
        activate(model, flat[0])
        state.save(t + 1, model, gamma, eta, history, done)
        if done:
            break
    return gamma, eta, history, trainable_state(model)


def run_em(cfg: Config, records, base_model, tokenizer, *, true_types=None, init_labels=None,
           log_fn=None, accelerator=None, run_dir=None) -> EMResult:  # fmt: skip
    """EM over `records` (with annotator ids) starting from `base_model`; see the module docstring.
    With `run_dir`, every iteration is checkpointed and a rerun continues where a killed one stopped."""
    names, index = annotator_index(records)
    K, em = cfg.em.n_types, cfg.em
    if K > len(names):
        raise ConfigError(f"config key 'em.n_types' = {K} exceeds the number of annotators ({len(names)})")
    if em.folds > len(names):
        raise ConfigError(
            f"config key 'em.folds' = {em.folds} exceeds the number of annotators ({len(names)})"
        )
    apply_chat_template(tokenizer, cfg.data)
    encoded = encode_data(tokenizer, records, cfg.data, "data.train", fit_lengths(cfg.data, base_model))
    if len(encoded) < len(records):  # records identical after truncation dropped (data.on_bad_row: skip)
        records = [records[i] for i in encoded.kept]
        names, index = annotator_index(records)
    pad = pad_token_id(tokenizer)
    finals = [f"type{k}" for k in range(K)]
    groups = [finals] if em.folds == 1 else [[f"fold{f}_type{k}" for k in range(K)] for f in range(em.folds)]
    model, _ = type_policies(base_model, em, cfg.model.lora, cfg.train.seed,
                             finals if em.folds == 1 else finals + [n for g in groups for n in g])  # fmt: skip
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
    folds = annotator_folds(len(names), em.folds, cfg.train.seed)[index] if em.folds > 1 else None
    data = _Data(
        encoded,
        index,
        names,
        torch.tensor([e.ranking + [-1] * (n - len(e.ranking)) for e in encoded]),
        torch.tensor([[j < len(e.response_ids) for j in range(n)] for e in encoded]),
        record_halves(index),
        folds,
    )
    if em.holdout and (data.halves < 0).any():
        logger.warning(
            "em.holdout: %d annotators have a single record; they are scored in-sample",
            len(set(index[data.halves < 0].tolist())),
        )
    if not cfg.train.resume and run_dir:  # starting over: an old iteration must not win
        shutil.rmtree(Path(run_dir) / "em", ignore_errors=True)

    def init(seed):
        return initial_gamma(em, records, index, names, seed, init_labels)

    best, finals_ll = None, []
    for r in range(em.restarts):
        gamma, eta, history, weights = _run_restart(cfg, r, model, groups, data, pad, init, true_types=true_types,
                                                    log_fn=log_fn, accelerator=accelerator, run_dir=run_dir)  # fmt: skip
        finals_ll.append(history[-1]["em/log_likelihood"])
        if best is None or finals_ll[-1] > best[0]:
            best = (finals_ll[-1], r, gamma, eta, history, weights)
    _, r, gamma, eta, history, weights = best
    if em.restarts > 1:  # the model holds the last restart: bring back the best one
        activate(model, finals[0])
        if weights is None:
            EMState(run_dir, r).load(EMState(run_dir, r).latest(), model)
        else:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, tensor in weights.items():
                    params[name].copy_(tensor)
    if em.folds > 1:
        model = _final_fit(
            cfg, model, finals, groups[0], data, gamma, pad, accelerator, run_dir, log_fn, history
        )
    activate(model, finals[0])
    return EMResult(model, tokenizer, finals, names, gamma, eta, history, finals_ll)


def _final_fit(cfg, model, finals, source, data, gamma, pad, accelerator, run_dir, log_fn, history):
    """Cross-fitted EM's deliverable: type k := fold 0's type k, then one M-step on every annotator."""
    for name, src in zip(finals, source):
        copy_type(model, src, name)
    rng = np.random.default_rng([cfg.train.seed, 1 << 20])  # apart from every iteration
    items = m_step_items(data.encoded, data.index, gamma, cfg.em.m_step, rng)
    m_dir = str(Path(run_dir) / "m_steps" / "final") if run_dir else ""
    activate(model, finals[0])
    fitted = fit(model, items, make_collate(pad), make_step(finals, cfg.loss.beta),
                 dataclasses.replace(cfg.train, output_dir=m_dir), accelerator=accelerator,
                 desc="EM final M-step on every annotator")  # fmt: skip
    losses = [h["loss"] for h in fitted.history if "loss" in h]
    entry = {"step": history[-1]["step"] + 1, "em/final_fit_loss": float(np.mean(losses)) if losses else None}
    if log_fn is not None:
        log_fn(entry)
    return fitted.model


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
