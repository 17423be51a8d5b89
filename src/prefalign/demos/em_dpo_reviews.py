"""The language-model half of `prefalign demo em-dpo`, in the reviews world (a tiny GPT-2 per type policy).

memorisation  enthusiast vs critic 50/50, ONE ternary ranking per annotator: EM-DPO with cross-fitting by
              annotator folds, so the logged log-likelihood is held out; the in-sample one (each annotator
              under policies trained on it) is logged beside it, and the run stops at its plateau. Reported
              with the bandit's metrics: mixture error (implicit vs true utilities on held-out reference
              samples, centred per prompt), weight error, norm ratio, ARI beside the oracle's, log-likelihood
              of the truth vs an indifferent population.
fairness      0.6/0.3/0.1 enthusiast/concise/critic, 8 ternary rankings per annotator: pooled listwise DPO vs
              EM-DPO + MMRA (weights from a true-reward and from an implicit-reward cross-evaluation). Regret
              of type t = J_t(best available policy for t) − J_t(π), true rewards on held-out prompts, the best
              taken over every trained policy: oracle per-type DPO policies (trained on each true type's
              records alone), EM's type policies and pooled DPO.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from prefalign import runner
from prefalign.core.config import build
from prefalign.core.logprobs import generate_responses
from prefalign.losses.lm import ranking_log_likelihood
from prefalign.methods import dpo
from prefalign.methods.em_dpo import em as em_dpo
from prefalign.methods.em_dpo.aggregate import (
    cross_evaluation,
    implicit_rewards,
    min_max_regret,
    regret_matrix,
)
from prefalign.methods.em_dpo.recovery import adjusted_rand_index, mixture_recovery
from prefalign.worlds.reviews import TYPES, true_reward

OPPOSITE = {"enthusiast": 0.5, "critic": 0.5}
UNEQUAL = {"enthusiast": 0.6, "concise": 0.3, "critic": 0.1}
BETA = 0.1
# Plackett-Luce temperature of the simulated annotators. At the world's default 1.0 (rewards in [-1, 1]) even
# the oracle that knows both true rewards classifies ternary annotators at ARI 0.15 (1 record) / 0.68 (8);
# at 0.25 it reaches 0.68 / 1.0 (see `oracle_posterior` and docs/em_dpo.md).
TEMPERATURE = 0.25
LEARNING_RATE = 3e-3  # full fine-tuning of each type copy (and of the pooled and oracle DPO baselines)


def settings(quick: bool) -> dict:
    if quick:
        return dict(quick=True, annotators=320, iterations=3, fair_annotators=120, per_annotator=8,
                    fair_iterations=2, samples=4)  # fmt: skip
    return dict(quick=False, annotators=1600, iterations=8, fair_annotators=240, per_annotator=8,
                fair_iterations=4, samples=8)  # fmt: skip


def em_config(
    out_dir, K, iterations, seed, init="dirichlet", quick=False, folds=2, in_sample=False
) -> em_dpo.Config:
    # the saved config names the reference the run started from, so `prefalign aggregate` rebuilds the same one
    model = "world:reviews-quick" if quick else "world:reviews"
    return build(
        em_dpo.Config,
        {
            "model": {"name_or_path": model, "lora": {"enabled": True, "r": 8, "alpha": 16}},
            "data": {"max_length": 64, "max_prompt_length": 16},
            # full copies: on this 117K-parameter model LoRA DPO learns a much weaker reward (docs/em_dpo.md)
            "em": {
                "n_types": K,
                "max_iterations": iterations,
                "m_step": "stochastic",
                "init": init,
                "adapter": "full",
                # cross-fitting: fold f's policies never train on the annotators they score
                "folds": folds,
                "in_sample_loglik": in_sample and folds > 1,  # one more E-step pass: only where reported
                "tolerance": 1e-3,
            },
            "loss": {"beta": BETA},
            "train": {
                "output_dir": str(out_dir),
                "seed": seed,
                "epochs": 1.0,
                "batch_size": 16,
                "learning_rate": LEARNING_RATE,
                "warmup_steps": 5,
                "log_every": 10,
                "progress": False,
            },
        },
    )


def _padded(rows, fill, n):
    return [list(r) + [fill] * (n - len(r)) for r in rows]


def oracle_posterior(records, types: dict, population: dict, temperature: float) -> dict:
    """Bayes posterior of each annotator's type under the TRUE utilities r_t / T (prior = population): its ARI
    is the ceiling any EM can reach on this data. Also the log-likelihood per annotator of the truth and of an
    indifferent population (every ranking uniformly random)."""
    names, index = em_dpo.annotator_index(records)
    n = max(len(r.responses) for r in records)
    ranking = torch.tensor(_padded([r.ranking for r in records], -1, n))
    present = torch.tensor(_padded([[True] * len(r.responses) for r in records], False, n))
    utilities = [torch.tensor(_padded([true_reward(t, r.responses) / temperature for r in records], 0.0, n))
                 for t in population]  # fmt: skip
    loglik = torch.stack([ranking_log_likelihood(u, ranking, present) for u in utilities], -1).double()
    gamma, _, total = em_dpo.e_step(loglik, index, len(names), torch.tensor(list(population.values())))
    flat = float(ranking_log_likelihood(torch.zeros(len(records), n), ranking, present).double().sum())
    truth = [list(population).index(types[u]) for u in names]
    return {
        "ari": adjusted_rand_index(truth, gamma.numpy()),
        "accuracy": float(np.mean(gamma.argmax(1).numpy() == np.array(truth))),
        "loglik_truth": total / len(names),
        "loglik_indifferent": flat / len(names),
        "loglik_truth_minus_indifferent": (total - flat) / len(names),
    }


def train_em(cfg, records, base, tokenizer, types):
    """EM-DPO through the runner -> an EMResult-like view (model, adapters, eta, history)."""
    res = runner.run(cfg, records=records, model=copy.deepcopy(base), tokenizer=tokenizer, true_types=types)
    adapters = [f"type{k}" for k in range(cfg.em.n_types)]
    history = [h for h in res.history if "iteration" in h]
    return SimpleNamespace(model=res.model, adapters=adapters, eta=np.array(res.summary["type_weights"]),
                           history=history)  # fmt: skip


def mixture_metrics(result, tokenizer, world, records, types, population, seed) -> dict:
    """The bandit's recovery metrics for a language-model EM run (see the module docstring)."""
    prompts = world.eval_prompts * 4
    with result.model.disable_adapter():
        samples = generate_responses(result.model, tokenizer, prompts, n_per_prompt=4, seed=seed + 7)
    implicit = implicit_rewards(result.model, tokenizer, prompts, samples, result.adapters, BETA).double()
    recovered = (implicit - implicit.mean(-1, keepdim=True)).reshape(len(result.adapters), -1).numpy()
    truth = np.stack([np.array([true_reward(t, ys) / TEMPERATURE for ys in samples]) for t in population])
    truth = (truth - truth.mean(-1, keepdims=True)).reshape(len(population), -1)
    names = list(dict.fromkeys(r.annotator for r in records))
    oracle = oracle_posterior(records, types, population, TEMPERATURE)
    last = result.history[-1]
    return {
        **mixture_recovery(recovered, truth, result.eta, list(population.values())),
        "ari": last.get("em/ari"),
        "oracle_ari": oracle["ari"],
        "loglik_heldout": last["em/log_likelihood"] / len(names),
        "loglik_in_sample": (last.get("em/log_likelihood_in_sample") or float("nan")) / len(names),
        **{k: v for k, v in oracle.items() if k.startswith("loglik")},
        "iterations": len(result.history),
        "plateau": bool(last.get("em/plateau")),
        "eta": result.eta.tolist(),
        "history": [
            {k: v for k, v in h.items() if k.startswith(("em/", "iteration", "loss"))} for h in result.history
        ],
    }


def memorisation(world, base, tokenizer, seed: int, s: dict, out_dir: Path) -> dict:
    started = time.time()
    records, types = world.preference_data(
        world.train_prompts * (s["annotators"] // len(world.train_prompts) + 1),
        OPPOSITE,
        n_responses=3,
        records_per_annotator=1,
        temperature=TEMPERATURE,
        seed=seed,
    )
    records = records[: s["annotators"]]
    types = {r.annotator: types[r.annotator] for r in records}
    cfg = em_config(out_dir, 2, s["iterations"], seed, init="dirichlet", quick=s["quick"], in_sample=True)
    result = train_em(cfg, records, base, tokenizer, types)
    return {**mixture_metrics(result, tokenizer, world, records, types, OPPOSITE, seed),
            "seconds": round(time.time() - started, 1)}  # fmt: skip


def _dpo(records, base, tokenizer, out_dir, seed, epochs, name_or_path):
    """Listwise DPO with full fine-tuning (like the EM type copies) -> the trained model."""
    cfg = build(dpo.Config, {
        "model": {"name_or_path": name_or_path},
        "data": {"max_length": 64, "max_prompt_length": 16},
        "loss": {"name": "plackett_luce", "beta": BETA},
        "train": {"output_dir": str(out_dir), "seed": seed, "epochs": float(epochs), "batch_size": 16,
                  "learning_rate": LEARNING_RATE, "warmup_steps": 5, "log_every": 10, "resume": False,
                  "progress": False},
    })  # fmt: skip
    return runner.run(
        cfg, records=records, eval_records=[], model=copy.deepcopy(base), tokenizer=tokenizer
    ).model


def fairness(world, base, tokenizer, seed: int, s: dict, out_dir: Path) -> dict:
    n, seconds = s["fair_annotators"], {"start": time.time()}
    prompts = world.train_prompts * (n * s["per_annotator"] // len(world.train_prompts) + 1)
    records, types = world.preference_data(
        prompts[: n * s["per_annotator"]], UNEQUAL, n_responses=3, records_per_annotator=s["per_annotator"],
        temperature=TEMPERATURE, seed=seed,
    )  # fmt: skip
    seconds["data"] = time.time()
    cfg = em_config(out_dir / "em", 3, s["fair_iterations"], seed, init="whitened", quick=s["quick"])
    # its run directory is one `prefalign aggregate` takes
    result = train_em(cfg, records, base, tokenizer, types)
    seconds["em"] = time.time()
    model, adapters, names = result.model, result.adapters, list(UNEQUAL)
    reward_fns = [lambda x, y, f=TYPES[t]: f(y) for t in names]
    # MMRA on the training prompts, cross-evaluated by the TRUE type rewards (this world knows them; deployed)
    # and by the implicit rewards (what `prefalign aggregate` can do without ground truth; reported alongside)
    common = dict(n_samples=s["samples"], seed=seed)
    L_true, _ = cross_evaluation(
        model, tokenizer, world.train_prompts, adapters, reward_fns=reward_fns, **common
    )
    L_implicit, _ = cross_evaluation(model, tokenizer, world.train_prompts, adapters, beta=BETA, **common)
    mmra, mmra_implicit = min_max_regret(L_true), min_max_regret(L_implicit)
    seconds["mmra"] = time.time()
    # the same number of passes over each record as the EM policies had M-steps
    epochs = s["fair_iterations"]
    pooled = _dpo(records, base, tokenizer, out_dir / "pooled", seed, epochs, cfg.model.name_or_path)
    oracle = [_dpo([r for r in records if types[r.annotator] == t], base, tokenizer, out_dir / f"oracle-{t}",
                   seed, epochs, cfg.model.name_or_path) for t in names]  # fmt: skip
    seconds["baselines"] = time.time()
    others = em_dpo.TypeCopies(pooled, ["pooled"] + [f"oracle-{t}" for t in names])
    for t, m in zip(names, oracle):
        others.copies[f"oracle-{t}"] = m
    held_out = dict(n_samples=s["samples"], seed=seed + 1, reward_fns=reward_fns)
    G, _ = cross_evaluation(
        model, tokenizer, world.eval_prompts * 2, adapters, **held_out
    )  # [type, EM policy]
    H, _ = cross_evaluation(others, tokenizer, world.eval_prompts * 2, list(others.copies), **held_out)
    J = np.concatenate([G, H], 1)  # every trained policy: EM's, pooled, the oracles
    best = J.max(1)
    R = regret_matrix(J)  # regret against each type's best available policy (>= 0)
    out = {"pooled_dpo": _policy_row(names, best, H[:, 0], R[:, len(adapters)])}
    for key, game in (("mmra", mmra), ("mmra_implicit", mmra_implicit)):
        reward = G @ np.asarray(game["weights"])
        out[key] = {**_policy_row(names, best, reward, best - reward), "weights": game["weights"],
                    "train_max_regret": game["max_regret"]}  # fmt: skip
    out["oracle_true_reward"] = dict(zip(names, np.diag(H[:, 1:]).tolist()))
    out["best_policy"] = dict(
        zip(names, [_column_name(j, adapters, list(others.copies)) for j in J.argmax(1)])
    )
    out["em"] = {
        **{k: v for k, v in mixture_metrics(result, tokenizer, world, records, types, UNEQUAL, seed).items()
           if k != "history"},
        "true_reward_by_adapter": G.tolist(),
    }  # fmt: skip
    seconds["evaluation"] = time.time()
    marks = list(seconds.values())
    out["seconds"] = {k: round(b - a, 1) for k, a, b in zip(list(seconds)[1:], marks, marks[1:])}
    return out


def _policy_row(names, best, reward, regret) -> dict:
    regret = np.maximum(best - reward, 0.0) if regret is None else np.asarray(regret)
    return {"max_regret": float(regret.max()), "true_reward": dict(zip(names, np.asarray(reward).tolist())),
            "regret": dict(zip(names, regret.tolist()))}  # fmt: skip


def _column_name(j, adapters, others) -> str:
    return f"em:{adapters[j]}" if j < len(adapters) else others[j - len(adapters)]
