"""EM-DPO from a noisy start in the reviews world: can EM repair a 25%-wrong labelling of 48 annotators?

    OMP_NUM_THREADS=1 python benchmarks/em_noisy_start.py [--annotators 48] [--seeds 0 1] [--modes holdout folds]

Enthusiast vs critic annotators (50/50), 8 ternary rankings each at T = 0.25 (the oracle classifies them at
ARI ~1.0), EM-DPO with full type copies, lr 3e-3, 3 epochs per M-step, 4 iterations, from labels with every
4th annotator flipped (start ARI ~0.25). Prints the ARI per iteration and the correlation of each type
policy's implicit reward with the true enthusiast reward on held-out reference samples. Modes: `holdout`
(alternate halves of each annotator's records) and `folds` (cross-fitting by annotator folds, 2 folds).

This was tests/test_em_dpo.py::test_em_recovers_two_opposite_types_end_to_end, a non-strict xfail (the
project's standards forbid them): it asked for ARI > max(0.5, start + 0.2) and |corr| > 0.3 with opposite
signs, which EM does not reach reliably at this scale. Measured numbers are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from prefalign.core.logprobs import generate_responses
from prefalign.core.train import TrainConfig
from prefalign.methods.em_dpo import em as em_dpo
from prefalign.methods.em_dpo.aggregate import implicit_rewards
from prefalign.worlds.reviews import ReviewsWorld, true_reward


def run(n_annotators: int, seed: int, mode: str) -> dict:
    world = ReviewsWorld(seed=0, quick=True)
    base, tokenizer = world.reference()
    records, truth = world.preference_data(
        world.train_prompts * 8,
        {"enthusiast": 0.5, "critic": 0.5},
        n_responses=3,
        records_per_annotator=8,
        n_annotators=n_annotators,
        temperature=0.25,
        seed=seed,
    )
    names = list(truth)
    noisy = {u: (int(truth[u] == "critic") + (i % 4 == 0)) % 2 for i, u in enumerate(names)}
    start_ari = em_dpo.adjusted_rand(truth, names, np.eye(2)[[noisy[u] for u in names]])
    em = {"n_types": 2, "max_iterations": 4, "init": "labels", "init_labels": "-", "adapter": "full",
          "tolerance": None, **({"holdout": True} if mode == "holdout" else {"folds": 2})}  # fmt: skip
    cfg = em_dpo.Config(
        em=em_dpo.EMConfig(**em),
        loss=em_dpo.LossConfig(beta=0.1),
        train=TrainConfig(
            output_dir="", epochs=3.0, batch_size=16, learning_rate=3e-3, progress=False, seed=seed
        ),
    )
    cfg.data.max_length, cfg.data.max_prompt_length = 64, 16
    started = time.time()
    result = em_dpo.run_em(cfg, records, copy.deepcopy(base), tokenizer, true_types=truth, init_labels=noisy)
    model = result.model
    with model.disable_adapter():
        samples = generate_responses(model, tokenizer, world.eval_prompts, n_per_prompt=8, seed=5)
    rewards = implicit_rewards(model, tokenizer, world.eval_prompts, samples, result.adapters, beta=0.1)
    true = true_reward("enthusiast", [y for ys in samples for y in ys])
    corr = [float(np.corrcoef(rewards[k].reshape(-1).numpy(), true)[0, 1]) for k in range(2)]
    return {
        "mode": mode,
        "seed": seed,
        "start_ari": round(start_ari, 3),
        "ari": [round(h["em/ari"], 3) for h in result.history],
        "heldout_corr": [round(c, 3) for c in corr],
        "seconds": round(time.time() - started, 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotators", type=int, default=48)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--modes", nargs="+", default=["holdout", "folds"], choices=["holdout", "folds"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    for mode in args.modes:
        for seed in args.seeds:
            print(run(args.annotators, seed, mode), flush=True)


if __name__ == "__main__":
    main()
