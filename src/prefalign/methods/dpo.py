"""DPO and its variants on a causal LM (full fine-tuning or LoRA), pairwise and listwise.

Loss by name (`loss.name`): dpo (sigmoid; `label_smoothing` = conservative DPO), robust, ipo, hinge,
simpo (reference-free), plackett_luce (listwise rankings; equals dpo on pairs) and sft (NLL of the best
response). The losses are pure functions in `prefalign.losses.lm`; this file wires data, log-probs, the
reference and the runner's training loop together:

    records -> encode (prompt once, each response + EOS) -> reference log-probs (precomputed by default)
    -> each step: policy log-probs of every candidate (one forward) -> loss -> TRL-named metrics
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from prefalign.core.config import build_loss
from prefalign.core.console import lm_rows
from prefalign.core.data import DataConfig, load_records
from prefalign.core.encode import apply_chat_template, fit_lengths
from prefalign.core.encode_arrow import encode_data
from prefalign.core.errors import ConfigError
from prefalign.core.evaluation import held_out_records, truth_notes_and_samples
from prefalign.core.logprobs import choose_layout, collate, sequence_logps
from prefalign.core.metrics import WeightedMean, preference_metrics
from prefalign.core.models import (
    ModelConfig,
    disable_dropout,
    load_base_model,
    load_policy,
    load_trained,
    pad_token_id,
    save_model,
)
from prefalign.core.reference import precompute_reference_logps, prepare_reference
from prefalign.core.train import Job, TrainConfig, join_evaluations
from prefalign.losses.lm import (
    dpo_loss,
    hinge_loss,
    ipo_loss,
    plackett_luce_loss,
    robust_dpo_loss,
    sft_loss,
    simpo_loss,
)

PAIRWISE = {
    "dpo": dpo_loss,
    "sigmoid": dpo_loss,
    "cdpo": dpo_loss,
    "robust": robust_dpo_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "slic": hinge_loss,
}
LOSSES = {**PAIRWISE, "simpo": simpo_loss, "plackett_luce": plackett_luce_loss, "sft": sft_loss}
REFERENCE_FREE = {"simpo", "sft"}
# keys of older configs -> where they live now (`prefalign train` says so once per key)
RENAMES = {
    "reference.strategy": "model.reference.strategy",
    "reference.cache_dir": "model.reference.cache_dir",
    "eval_batch_size": "train.eval_batch_size",
}


@dataclass
class LossConfig:
    """`loss:`. Options left empty take the chosen loss's own default (see its docstring)."""

    name: str = "dpo"  # dpo | sigmoid | cdpo | robust | ipo | hinge | slic | simpo | plackett_luce | sft
    beta: float | None = None  # β: inverse temperature of the implicit reward (dpo family 0.1, simpo 2.0)
    label_smoothing: float | None = None  # dpo/cdpo: conservative DPO ε; robust: assumed label-flip rate
    gamma: float | None = None  # simpo: target margin
    average_logps: bool | None = None  # length-normalized log-probs (default: only for simpo)

    def validate(self):
        if self.label_smoothing is not None and not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(
                f"config key 'loss.label_smoothing' must be in [0, 0.5), got {self.label_smoothing}"
            )
        if self.beta is not None and not self.beta > 0:
            raise ConfigError(f"config key 'loss.beta' must be > 0, got {self.beta}")
        build_loss(self, LOSSES, consumed=("average_logps",))  # unknown name, options the loss does not take


@dataclass
class Config:
    method: str = "dpo"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/dpo"))


class PreferenceLoss:
    """The configured loss, built once: `(policy_logps, reference_logps, ranking, n_tokens, mask) ->
    (losses [B], rewards [B, n])` for any loss name; rewards are the implicit rewards of every candidate."""

    def __init__(self, section: LossConfig):
        self.name, self.fn, self.options = build_loss(section, LOSSES, consumed=("average_logps",))
        self.average = self.name == "simpo" if section.average_logps is None else section.average_logps
        self.beta = self.options.get("beta", 0.0)
        self.needs_reference = self.name not in REFERENCE_FREE

    def __call__(self, policy_logps, reference_logps, ranking, n_tokens, candidate_mask):
        if self.name == "plackett_luce":
            return self.fn(
                policy_logps, reference_logps, ranking, candidate_mask=candidate_mask, **self.options
            )
        rows = torch.arange(ranking.shape[0], device=ranking.device)
        best = ranking[:, 0]
        if self.name == "sft":
            losses = self.fn(policy_logps[rows, best], n_tokens[rows, best])
            return losses, torch.zeros_like(policy_logps)
        if ranking.shape[1] != 2 or bool((ranking < 0).any()):
            raise ConfigError(f"loss '{self.name}' needs pairs; use loss.name: plackett_luce for rankings")
        worst = ranking[:, 1]
        chosen, rejected = policy_logps[rows, best], policy_logps[rows, worst]
        if self.name == "simpo":
            losses, chosen_r, rejected_r = self.fn(chosen, rejected, **self.options)
        else:
            refs = reference_logps[rows, best], reference_logps[rows, worst]
            losses, chosen_r, rejected_r = self.fn(chosen, rejected, *refs, **self.options)
        rewards = torch.zeros_like(policy_logps).detach()
        rewards[rows, best], rewards[rows, worst] = chosen_r, rejected_r
        return losses, rewards


def check_records_fit(records, loss: PreferenceLoss, where: str = "data.train") -> None:
    """Pairwise losses take pairs only: fail before any work, naming the first record that is not one."""
    if loss.name not in PAIRWISE and loss.name != "simpo":
        return
    if hasattr(records, "counts"):  # records on disk: find the first non-pair from the Arrow columns
        n_responses, n_ranked = records.counts()
        bad = np.flatnonzero((n_responses != 2) | (n_ranked != 2))
        records = {int(i): records[int(i)] for i in bad[:1]}.items()
    else:
        records = enumerate(records)
    for i, record in records:
        if len(record.responses) != 2 or len(record.ranking) != 2:
            raise ConfigError(
                f"{where}: record {i} has {len(record.responses)} responses ranked {record.ranking}, but loss "
                f"'{loss.name}' needs pairs; use loss.name: plackett_luce for rankings"
            )


def make_step(loss: PreferenceLoss, reference_fn=None):
    """step_fn for `core.train.fit`; `reference_fn(batch)` gives live reference log-probs (else precomputed)."""

    def step(model, batch):
        policy_logps, n_tokens = sequence_logps(model, batch, average=loss.average)
        if not loss.needs_reference:
            reference_logps = torch.zeros_like(policy_logps)
        elif reference_fn is not None:
            reference_logps = reference_fn(batch)
        else:
            reference_logps = batch["reference_logps"]
        mask = batch["candidate_index"] >= 0
        losses, rewards = loss(policy_logps, reference_logps, batch["ranking"], n_tokens, mask)
        if loss.name == "sft":  # no rewards: the likelihood of the response
            return sft_metrics(losses, batch["weight"], policy_logps, n_tokens, batch["ranking"])
        return preference_metrics(losses, batch["weight"], rewards, policy_logps, batch["ranking"], mask)

    return step


def sft_metrics(losses, weight, logps, n_tokens, ranking):
    """-> (weighted mean loss, metrics) of an SFT batch: `logps/chosen` (the response's summed log-prob, as
    in TRL's preference logs) and `nll_per_token` (its mean negative log-likelihood per token, the log of
    the perplexity), weighted means over records like every other metric."""
    rows = torch.arange(len(losses), device=losses.device)
    best = ranking[:, 0]
    chosen, tokens = logps[rows, best].detach(), n_tokens[rows, best].clamp(min=1)
    w = weight / weight.sum()
    metrics = {"logps/chosen": chosen, "nll_per_token": -chosen / tokens}
    return (losses * w).sum(), {name: (value * w).sum() for name, value in metrics.items()}


@torch.no_grad()
def evaluate_loss(model, encoded, loss: PreferenceLoss, pad: int, batch_size: int, reference_fn=None) -> dict:
    """Held-out loss and metrics: weighted means over ALL records (independent of `batch_size`)."""
    step = make_step(loss, reference_fn)
    device = next(model.parameters()).device
    total = WeightedMean()
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(chunk, pad).items()}
        value, metrics = step(model, batch)
        total.add({"loss": value, **metrics}, float(batch["weight"].sum()))
    return total.result()


def setup(cfg: Config, ctx, *, records=None, eval_records=None, model=None, tokenizer=None, evaluate_fn=None):
    """The run as a `Job`. Library callers may pass records and a loaded policy + tokenizer; the policy as
    passed is the reference."""
    loss = PreferenceLoss(cfg.loss)
    if records is None:
        records, eval_records = load_records(cfg.data, cfg.train.seed, sft_rows=loss.name == "sft")
    if not records:
        raise ConfigError("no training records")
    check_records_fit(records, loss)
    check_records_fit(eval_records or [], loss, "data.eval")
    if model is None:
        model, tokenizer = load_policy(cfg.model, seed=cfg.train.seed)
    elif not cfg.model.dropout:
        disable_dropout(model)
    model.to(ctx.accelerator.device)  # precompute and the packing check run on the training device
    pad = pad_token_id(tokenizer)
    apply_chat_template(tokenizer, cfg.data)
    lengths = fit_lengths(cfg.data, model)
    train_set = encode_data(tokenizer, records, cfg.data, "data.train", lengths)
    eval_set = encode_data(tokenizer, eval_records or [], cfg.data, "data.eval", lengths)
    # packed or padded, decided on this model and the longest training records before any heavy work
    packed = choose_layout(model, train_set, pad, cfg.data.packing)
    reference_fn = None
    if loss.needs_reference:
        reference_fn = prepare_reference(
            model,
            cfg.model.reference,
            [train_set, eval_set],
            pad_token_id=pad,
            batch_size=cfg.train.eval_batch_size,
            average=loss.average,
            cache_dir=str(ctx.run_dir / "reference_cache"),
        )

    held_out = (
        (lambda policy: evaluate_loss(policy, eval_set, loss, pad, cfg.train.eval_batch_size, reference_fn))
        if eval_set
        else None
    )
    evaluate = join_evaluations(held_out, evaluate_fn)
    reference = cfg.model.reference.strategy if loss.needs_reference else None  # for the console

    return Job(
        model=model,
        dataset=train_set,
        collate=lambda items: collate(items, pad, packed=packed),
        step=make_step(loss, reference_fn),
        evaluate=evaluate,
        save=lambda trained, path: save_model(trained, tokenizer, path),
        desc=loss.name,
        info=lm_rows(cfg, records, eval_records, train_set, reference, packed),
    )


def evaluate_run(run_dir: Path, cfg: Config, data: str | None = None, samples: int = 0) -> dict:
    """`prefalign eval RUN_DIR`: held-out loss and metrics on the run's eval data (or on `data`), the world's
    ground truth when the run started from a registered source (`world:...`), and `samples` generated
    samples beside the reference's."""
    policy, tokenizer = load_trained(Path(run_dir) / "final", cfg.model)
    policy.eval()
    out: dict = {}
    loss = PreferenceLoss(cfg.loss)
    eval_records, note = held_out_records(cfg.data, cfg.train.seed, data, sft_rows=loss.name == "sft")
    check_records_fit(eval_records, loss, data or "data.eval")
    reference = load_base_model(cfg.model) if (eval_records and loss.needs_reference) or samples else None
    if eval_records:
        pad = pad_token_id(tokenizer)
        apply_chat_template(tokenizer, cfg.data)
        encoded = encode_data(
            tokenizer, eval_records, cfg.data, data or "data.eval", fit_lengths(cfg.data, policy)
        )
        if loss.needs_reference:
            precompute_reference_logps(
                reference,
                encoded,
                batch_size=cfg.train.eval_batch_size,
                pad_token_id=pad,
                cache_dir=str(Path(run_dir) / "reference_cache"),
                average=loss.average,
            )
        metrics = evaluate_loss(policy, encoded, loss, pad, cfg.train.eval_batch_size)
        out.update({f"eval/{k}": v for k, v in metrics.items()})
    return truth_notes_and_samples(
        out, note, cfg, run_dir, policy, tokenizer, eval_records, samples, reference
    )
