"""MPO: Maximum Preference Optimization with importance sampling (Jiang et al., arXiv 2312.16430).

RECONSTRUCTION. The paper has no public code and only its abstract could be read; the objective below is
ours, built to be consistent with every claim of the abstract (see docs/mpo.md). Each reconstructed part
is a named, switchable option of `MPOSettings`.

The preference itself is the reward: maximize the win rate E_{y~π}[P(y ≻ μ | x)] of the policy against
the data distribution μ. Importance sampling over a pair {y_w, y_l} ~ μ with self-normalized weights
(assuming μ(y_w|x) ≈ μ(y_l|x)) weights the winner by

    w_θ = π(y_w|x) / (π(y_w|x) + π(y_l|x)) = σ(log π(y_w|x) − log π(y_l|x))

which gives a bounded, reference-free preference term. The off-policy KL regularizer
KL(π_ref ‖ π) = const − E_{y~π_ref}[log π(y|x)] is an NLL on samples of the reference drawn ONCE before
training (the regularization set D_ref), optionally plus SFT/pretraining text D_extra:

    L_MPO = −E_{D_p}[σ(β·(log π(y_w|x) − log π(y_l|x)))] + λ·E_{D_ref}[−log π(y|x)/|y|] + λ_x·E_{D_extra}[...]

So no reference model is loaded and no reference log-prob is computed during optimization: one model in
memory, one forward per batch (preference pairs and regularization samples go through it together).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from prefalign.core.config import build_loss
from prefalign.core.console import lm_rows, progress
from prefalign.core.data import DataConfig, load_records
from prefalign.core.encode import apply_chat_template, chat_template_text, fit_lengths
from prefalign.core.encode_arrow import encode_data
from prefalign.core.errors import ConfigError
from prefalign.core.evaluation import held_out_records, truth_notes_and_samples
from prefalign.core.logprobs import collate, generate_responses, sequence_logps
from prefalign.core.metrics import WeightedMean, preference_metrics
from prefalign.core.models import (
    ModelConfig,
    disable_dropout,
    load_base_model,
    load_policy,
    load_tokenizer,
    load_trained,
    pad_token_id,
    save_model,
)
from prefalign.core.train import Job, TrainConfig, join_evaluations
from prefalign.losses.mpo import mpo_listwise_loss, regularization_nll

LOSSES = {"mpo": mpo_listwise_loss}
RENAMES = {
    "mpo.beta": "loss.beta",
    "mpo.lam": "loss.regularization_weight",
    "mpo.average_logps": "loss.average_logps",
    "mpo.per_token_regularization": "loss.per_token_regularization",
    "mpo.extra_weight": "loss.extra_weight",
    "eval_batch_size": "train.eval_batch_size",
}

# ---------------------------------------------------------------- config


@dataclass
class LossConfig:
    """`loss:` of MPO (every part is our reconstruction, docs/mpo.md)."""

    name: str = "mpo"  # the only loss: mpo
    beta: float | None = None  # temperature inside σ (default 1: the plain importance weight)
    regularization_weight: float = (
        1.0  # λ, weight of the off-policy KL regularizer (NLL of reference samples)
    )
    # length-normalized log-probs in the preference term. Default on: with summed log-probs two independent
    # samples differ by many nats, so σ saturates and most pairs give no gradient (docs/mpo.md, "Demo").
    average_logps: bool = True
    per_token_regularization: bool = True  # NLL / |y| (reconstruction) or summed NLL
    extra_weight: float = 0.0  # λ_x, weight of the NLL of `mpo.extra_text`
    # false: train the regularizer alone, the preference term off (a control: how far does the finite
    # regularization set move the policy by itself?). Its metrics are still logged.
    preference_term: bool = True

    def validate(self):
        build_loss(self, LOSSES, consumed=CONSUMED)
        if self.beta is not None and self.beta <= 0:
            raise ConfigError(f"config key 'loss.beta' must be > 0, got {self.beta}")
        for name in ("regularization_weight", "extra_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key 'loss.{name}' must be >= 0, got {getattr(self, name)}")


CONSUMED = (
    "regularization_weight",
    "average_logps",
    "per_token_regularization",
    "extra_weight",
    "preference_term",
)


@dataclass
class MPOSettings:
    """`mpo:` — the regularization set: reference samples drawn once, before training."""

    samples_per_prompt: int = 4  # reference samples per unique training prompt
    max_new_tokens: int = 64  # length limit of each reference sample
    temperature: float = 1.0  # 1 = samples of π_ref itself (the KL estimator needs that)
    top_p: float = 1.0  # nucleus sampling (1 = off, as the KL estimator needs)
    generation_batch_size: int = 64  # sequences generated at once
    chunk_prompts: int = 128  # prompts per atomically written chunk (resume granularity)
    regularization_dir: str | None = None  # default: <output_dir>/regularization
    extra_text: str | None = None  # optional SFT/pretraining text (.txt lines or .jsonl text|prompt+response)
    extra_weight: float = 0.0  # its weight λ_x

    def validate(self):
        for name in ("temperature", "top_p"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config key 'mpo.{name}' must be > 0, got {getattr(self, name)}")
        for name in ("samples_per_prompt", "max_new_tokens", "generation_batch_size", "chunk_prompts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key 'mpo.{name}' must be >= 1, got {getattr(self, name)}")


@dataclass
class Config:
    method: str = "mpo"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mpo: MPOSettings = field(default_factory=MPOSettings)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/mpo"))

    def validate(self):
        if self.loss.extra_weight > 0 and not self.mpo.extra_text:
            raise ConfigError(
                "config key 'loss.extra_weight' > 0 needs 'mpo.extra_text' (a .txt or .jsonl file)"
            )


# ---------------------------------------------------------------- regularization data


def regularization_dir(cfg: Config) -> Path:
    return Path(cfg.mpo.regularization_dir or Path(cfg.train.output_dir) / "regularization")


def unique_prompts(records) -> list:
    """Training prompts in first-seen order, each once (text or chat messages)."""
    seen, prompts = set(), []
    for record in records:
        key = json.dumps(record.prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            prompts.append(record.prompt)
    return prompts


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)  # a killed write never leaves a half chunk behind


def make_regularization_data(cfg: Config, *, records=None, model=None, tokenizer=None) -> Path:
    """Sample the reference on the unique training prompts once; store the samples in `RUN/regularization/`.

    `meta.json` fixes the settings and the prompts; `chunk-NNNNN.jsonl` hold {"prompt", "response"} rows,
    each chunk written atomically with its own seed, so a killed generation continues where it stopped and
    gives the same samples. `model` (e.g. the untrained policy) is used as the reference if given (LoRA
    adapters disabled); otherwise the reference is loaded from `cfg.model` and freed before returning.
    """
    out = regularization_dir(cfg)
    if records is None:
        records, _ = load_records(cfg.data, cfg.train.seed)
    prompts = unique_prompts(records)
    if not prompts:
        raise ConfigError("no training prompts to sample the regularization data on")
    s = cfg.mpo
    meta = {
        "prompts_hash": hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()[:16],
        "n_prompts": len(prompts),
        "samples_per_prompt": s.samples_per_prompt,
        "max_new_tokens": s.max_new_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "max_prompt_length": cfg.data.max_prompt_length,
        "chunk_prompts": s.chunk_prompts,
        "seed": cfg.train.seed,
        "model": cfg.model.name_or_path,
        # everything else that changes what the reference samples: its weights' revision and dtype, the
        # tokenizer and the chat template that render the prompts
        "revision": cfg.model.revision,
        "dtype": cfg.model.dtype,
        "tokenizer": cfg.model.tokenizer,
        "chat_template": chat_template_text(cfg.data.chat_template),
    }
    out.mkdir(parents=True, exist_ok=True)
    if (out / "meta.json").is_file():
        old = json.loads((out / "meta.json").read_text())
        if old != meta:
            changed = sorted(k for k in meta if old.get(k) != meta[k])
            raise ConfigError(
                f"{out} holds regularization data made with other settings ({', '.join(changed)}); "
                "delete it or set mpo.regularization_dir"
            )
    else:
        _write_atomic(out / "meta.json", json.dumps(meta, indent=2))
    starts = range(0, len(prompts), s.chunk_prompts)
    todo = [(i, start) for i, start in enumerate(starts) if not (out / f"chunk-{i:05d}.jsonl").is_file()]
    if not todo:
        return out
    owned = model is None
    if owned:
        model, tokenizer = (
            load_base_model(cfg.model),
            apply_chat_template(load_tokenizer(cfg.model), cfg.data),
        )
    # the model as it starts is the reference (a fresh LoRA adapter leaves it unchanged, a trained one is part
    # of it), so its adapters stay on
    for i, start in progress(todo, desc="mpo: regularization samples"):
        chunk = prompts[start : start + s.chunk_prompts]
        samples = generate_responses(
            model,
            tokenizer,
            chunk,
            n_per_prompt=s.samples_per_prompt,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            batch_size=s.generation_batch_size,
            seed=cfg.train.seed * 100_003 + i,
            max_prompt_length=cfg.data.max_prompt_length,
        )
        rows = [{"prompt": p, "response": r} for p, rs in zip(chunk, samples) for r in rs]
        _write_atomic(out / f"chunk-{i:05d}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    if owned:  # the reference is needed only here: free it before any optimization
        del model
        gc.collect()
    return out


def load_regularization_data(path) -> list[tuple]:
    """(prompt, response) pairs of a complete regularization directory, in order."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise ConfigError(f"{path}: no regularization data (meta.json missing); run `prefalign mpo-regdata`")
    meta = json.loads((path / "meta.json").read_text())
    n_chunks = -(-meta["n_prompts"] // meta["chunk_prompts"])
    missing = [i for i in range(n_chunks) if not (path / f"chunk-{i:05d}.jsonl").is_file()]
    if missing:
        raise ConfigError(
            f"{path}: regularization data incomplete ({len(missing)} of {n_chunks} chunks missing); "
            "run make_regularization_data again to finish it"
        )
    rows = []
    for i in range(n_chunks):
        for line in (path / f"chunk-{i:05d}.jsonl").read_text().splitlines():
            row = json.loads(line)
            rows.append((row["prompt"], row["response"]))
    return rows


def load_extra_text(path) -> list[tuple]:
    """(prompt, response) pairs of extra SFT/pretraining text: `.txt` (one text per non-blank line, no
    prompt) or `.jsonl` rows with `text`, or `prompt` + `response` (or `completion`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config key 'mpo.extra_text': file not found: {path}")
    numbered = [
        (n, ln) for n, ln in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if ln.strip()
    ]
    if path.suffix == ".txt":
        return [("", ln) for _, ln in numbered]
    if path.suffix not in (".jsonl", ".ndjson"):
        raise ConfigError(f"config key 'mpo.extra_text': {path}: expected a .txt or .jsonl file")
    pairs = []
    for row_number, (line_number, line) in enumerate(numbered):
        at = f"{path}: row {row_number}"  # the data convention: 0-based row, + the file's 1-based line
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{at}: not valid JSON ({e.msg}) (line {line_number})") from None
        response = (
            row.get("text", row.get("response", row.get("completion"))) if isinstance(row, dict) else None
        )
        if not isinstance(response, str):
            raise ConfigError(
                f"{at}: field 'text' (or 'response'/'completion'): expected text (line {line_number})"
            )
        prompt = row.get("prompt") or ""
        if not isinstance(prompt, (str, list)):
            raise ConfigError(f"{at}: field 'prompt': expected text or chat messages (line {line_number})")
        pairs.append((prompt, response))
    if not pairs:
        raise ConfigError(f"config key 'mpo.extra_text': {path} holds no text")
    return pairs


def encode_samples(tokenizer, pairs, data: DataConfig, lengths=None, name="mpo: regularization samples"):
    """(prompt, response) pairs -> one-candidate `EncodedRecord`s (the NLL rows of a batch); `lengths` from
    `core.encode.fit_lengths` (default: the data section's), truncation counted in one warning line."""
    records = [SimpleNamespace(prompt=p, responses=[r], ranking=[0]) for p, r in pairs]
    lengths = lengths or (data.max_length, data.max_prompt_length)
    return encode_data(tokenizer, records, data, name, lengths)


# ---------------------------------------------------------------- batch step


def collate_mpo(items, pad: int) -> dict:
    """Items (preference, regularization, extra or None) -> ONE collated batch: the preference records first,
    then the regularization samples, then the extra texts, so a single forward computes every log-prob."""
    preference = [p for p, _, _ in items]
    regularization = [r for _, r, _ in items]
    extra = [e for _, _, e in items if e is not None]
    batch = collate(preference + regularization + extra, pad)
    batch["n_preference"], batch["n_regularization"] = len(preference), len(regularization)
    return batch


def preference_term(loss: LossConfig, logps, n_tokens, ranking, candidate_mask):
    """Listwise MPO on the preference rows (equal to `mpo_loss` on pairs) -> (losses [B], rewards [B, n], logps).

    MPO has no reference: its implicit reward of a candidate is β·log π(y|x) (mean per token by default)."""
    if loss.average_logps:
        logps = logps / n_tokens.clamp(min=1)
    beta = 1.0 if loss.beta is None else loss.beta
    losses, _ = mpo_listwise_loss(logps, ranking, beta, candidate_mask)
    return losses, beta * logps.detach(), logps


def make_step(loss: LossConfig):
    """step_fn for `core.train.fit`: one forward, no reference anywhere."""

    def step(model, batch):
        logps, n_tokens = sequence_logps(model, batch)  # summed; [rows, n]
        n_pref, n_reg = batch["n_preference"], batch["n_regularization"]
        pref = slice(0, n_pref)
        mask, ranking = batch["candidate_index"][pref] >= 0, batch["ranking"][pref]
        losses, rewards, pref_logps = preference_term(loss, logps[pref], n_tokens[pref], ranking, mask)
        total, metrics = preference_metrics(losses, batch["weight"][pref], rewards, pref_logps, ranking, mask)
        metrics["mpo/preference_weight"] = (
            -(losses.detach() * batch["weight"][pref]).sum() / batch["weight"][pref].sum()
        )
        total = total * float(loss.preference_term)  # 0: the regularizer-only control
        reg = regularization_nll(
            logps[n_pref : n_pref + n_reg, 0],
            n_tokens[n_pref : n_pref + n_reg, 0],
            loss.per_token_regularization,
        ).mean()
        total = total + loss.regularization_weight * reg
        metrics["mpo/regularization_nll"] = reg.detach()
        if logps.shape[0] > n_pref + n_reg:
            extra = regularization_nll(
                logps[n_pref + n_reg :, 0], n_tokens[n_pref + n_reg :, 0], loss.per_token_regularization
            ).mean()
            total = total + loss.extra_weight * extra
            metrics["mpo/extra_nll"] = extra.detach()
        return total, metrics

    return step


@torch.no_grad()
def evaluate_preferences(model, encoded, loss: LossConfig, pad: int, batch_size: int) -> dict:
    """Held-out MPO preference loss (`mpo/preference_loss`), winner weight and the TRL-named metrics, as
    weighted means over all records."""
    device = next(model.parameters()).device
    total = WeightedMean()
    for start in range(0, len(encoded), batch_size):
        batch = {
            k: v.to(device) if torch.is_tensor(v) else v
            for k, v in collate(encoded[start : start + batch_size], pad).items()
        }
        logps, n_tokens = sequence_logps(model, batch)
        mask = batch["candidate_index"] >= 0
        losses, rewards, pref_logps = preference_term(loss, logps, n_tokens, batch["ranking"], mask)
        value, metrics = preference_metrics(
            losses, batch["weight"], rewards, pref_logps, batch["ranking"], mask
        )
        metrics = {"mpo/preference_loss": value, "mpo/preference_weight": -value, **metrics}
        total.add(metrics, float(batch["weight"].sum()))
    return total.result()


def setup(cfg: Config, ctx, *, records=None, eval_records=None, model=None, tokenizer=None, evaluate_fn=None):
    """The run as a `Job`. Library callers may pass records and a loaded policy + tokenizer; the policy as
    passed (before any update) must be the reference: it samples the regularization set if that is missing."""
    if records is None:
        records, eval_records = load_records(cfg.data, cfg.train.seed)
    if not records:
        raise ConfigError("no training records")
    if model is None:
        model, tokenizer = load_policy(cfg.model, seed=cfg.train.seed)
    elif not cfg.model.dropout:
        disable_dropout(model)
    model.to(ctx.accelerator.device)  # sampling the regularization set runs on the training device
    pad = pad_token_id(tokenizer)
    apply_chat_template(tokenizer, cfg.data)
    lengths = fit_lengths(cfg.data, model)
    # sampled from the untouched policy = the reference; no second model is ever loaded here
    reg_path = make_regularization_data(cfg, records=records, model=model, tokenizer=tokenizer)
    regularization = encode_samples(tokenizer, load_regularization_data(reg_path), cfg.data, lengths)
    extra = (
        encode_samples(tokenizer, load_extra_text(cfg.mpo.extra_text), cfg.data, lengths, "mpo.extra_text")
        if cfg.mpo.extra_text
        else []
    )
    train_set = encode_data(tokenizer, records, cfg.data, "data.train", lengths)
    eval_set = encode_data(tokenizer, eval_records or [], cfg.data, "data.eval", lengths)
    # item i <-> regularization sample i mod R (and extra text i mod E): fixed, so resume stays exact
    dataset = [
        (p, regularization[i % len(regularization)], extra[i % len(extra)] if extra else None)
        for i, p in enumerate(train_set)
    ]

    held_out = (
        (lambda policy: evaluate_preferences(policy, eval_set, cfg.loss, pad, cfg.train.eval_batch_size))
        if eval_set
        else None
    )
    evaluate = join_evaluations(held_out, evaluate_fn)

    return Job(
        model=model,
        dataset=dataset,
        collate=lambda items: collate_mpo(items, pad),
        step=make_step(cfg.loss),
        evaluate=evaluate,
        save=lambda trained, path: save_model(trained, tokenizer, path),
        desc="mpo",
        info={
            **lm_rows(cfg, records, eval_records, train_set, None),
            "reference": f"none in training: {len(regularization)} reference samples in {reg_path} (KL term)",
        },
    )


def evaluate_run(run_dir: Path, cfg: Config, data: str | None = None, samples: int = 0) -> dict:
    """`prefalign eval RUN_DIR`: held-out MPO metrics (on the run's eval data, or on `data`), for a
    `world:` start the world's ground truth, and `samples` generated samples beside the reference's."""
    policy, tokenizer = load_trained(Path(run_dir) / "final", cfg.model)
    policy.eval()
    out: dict = {}
    eval_records, note = held_out_records(cfg.data, cfg.train.seed, data)
    if eval_records:
        apply_chat_template(tokenizer, cfg.data)
        encoded = encode_data(
            tokenizer, eval_records, cfg.data, data or "data.eval", fit_lengths(cfg.data, policy)
        )
        metrics = evaluate_preferences(
            policy, encoded, cfg.loss, pad_token_id(tokenizer), cfg.train.eval_batch_size
        )
        out.update({f"eval/{k}": v for k, v in metrics.items()})
    return truth_notes_and_samples(out, note, cfg, run_dir, policy, tokenizer, eval_records, samples)
