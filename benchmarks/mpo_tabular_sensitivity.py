"""Does the tabular MPO verdict depend on the world's settings? The demo's tabular experiment
(`prefalign.demos.mpo_tabular`) rerun with one setting changed at a time.

    OMP_NUM_THREADS=1 python benchmarks/mpo_tabular_sensitivity.py            # 3 seeds, ~4 CPU minutes
    OMP_NUM_THREADS=1 python benchmarks/mpo_tabular_sensitivity.py --seeds 1 --only default pairs8

Per variant (seed mean): DPO's end-point KL over β, MPO's KL over λ (sampled regularizer / exact KL control),
the reward gap of MPO to the DPO/IPO frontier at equal KL (negative: below it) and the regularizer-only KL.
"""

from __future__ import annotations

import argparse
import time

import torch

from prefalign.demos import mpo_tabular as T

VARIANTS = {
    "default": {},
    "pairs8": {"settings": {"pairs_per_context": 8}},  # 4x the preference pairs: better coverage
    "uniform_reference": {"world": {"reference_scale": 0.0}},
    "mpo_beta0.3": {"mpo_beta": 0.3},  # temperature inside MPO's σ
    "samples64": {"settings": {"samples_per_prompt": 64}},  # a 4x larger regularization set
    "steps8000": {"settings": {"steps": 8000}},  # 4x longer training
}


def run_variant(change: dict, seeds: list[int]) -> dict:
    world, settings, beta = dict(T.WORLD), dict(T.SETTINGS), T.MPO_BETA
    try:
        T.WORLD.update(change.get("world", {}))
        T.SETTINGS.update(change.get("settings", {}))
        T.MPO_BETA = change.get("mpo_beta", beta)
        return T.summarize([T.run_seed(seed) for seed in seeds])
    finally:
        T.WORLD.clear(), T.WORLD.update(world)
        T.SETTINGS.clear(), T.SETTINGS.update(settings)
        T.MPO_BETA = beta


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    header = "| variant | DPO KL over β | MPO KL over λ (sampled / exact) | reward gap at equal KL (sampled / exact) "
    print(header + "| regularizer-only KL (16 samples) | s |")
    print("|---|---|---|---|---|---|")
    for name in args.only:
        start = time.time()
        summary = run_variant(VARIANTS[name], list(range(args.seeds)))
        c = summary["claims"]
        lam, gap = c["lambda_orders_kl"], c["mpo_reward_at_least_dpo_ipo"]
        reg = summary["runs"][f"regularizer_only/samples={T.SETTINGS['samples_per_prompt']}"]["kl"]
        print(
            f"| {name} | {T.span(c['dpo_ignores_beta']['kl'])} | {T.span(lam['kl'])} / "
            f"{T.span(lam['exact_kl_control'])} | {T.span(gap['reward_gap_at_equal_kl'], 3)} / "
            f"{T.span(gap['exact_kl_control_gap'], 3)} | {reg:.3f} | {time.time() - start:.0f} |"
        )


if __name__ == "__main__":
    main()
