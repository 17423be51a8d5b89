"""One EM-DPO iteration (K types) vs one listwise DPO epoch on the same data, side by side.

    OMP_NUM_THREADS=1 python benchmarks/em_vs_dpo.py [--records 512] [--types 4] [--m-step stochastic] [--no-holdout]

Both start from the reviews world's reference with the same LoRA size and the reference log-probs
already computed (a one-time cost for both, timed apart). EM iteration = M-step (stochastic: each record
trains the adapter of its annotator's sampled type, one forward per type present in a batch; weighted: K
forwards per batch) + E-step (K no-grad forward passes). With em.holdout (the default here; --no-holdout
turns it off) an iteration trains on one half of each annotator's records and scores the other half.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time

import numpy as np
import torch

from prefalign.core.logprobs import collate, encode_records
from prefalign.core.models import LoraSettings
from prefalign.core.reference import precompute_reference_logps
from prefalign.core.train import TrainConfig, fit, make_accelerator
from prefalign.methods.dpo import LossConfig, PreferenceLoss, make_step
from prefalign.methods.em_dpo import em as em_dpo
from prefalign.worlds.reviews import ReviewsWorld


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=512)
    parser.add_argument("--types", type=int, default=4)
    parser.add_argument("--m-step", default="stochastic", choices=["stochastic", "weighted"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--no-holdout", action="store_true", help="E-step scores all records (em.holdout: false)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    world = ReviewsWorld(seed=0, quick=True)
    base, tokenizer = world.reference()
    per_annotator = 8
    prompts = (world.train_prompts * (args.records // len(world.train_prompts) + 1))[: args.records]
    population = dict.fromkeys(["enthusiast", "critic", "concise", "foodie"][: args.types], 1.0)
    records, _ = world.preference_data(
        prompts, population, n_responses=3, records_per_annotator=per_annotator
    )
    pad = tokenizer.pad_token_id
    train_cfg = TrainConfig(
        output_dir="", epochs=1.0, batch_size=args.batch_size, learning_rate=1e-3, progress=False
    )
    accelerator = make_accelerator(train_cfg)
    lora = LoraSettings(r=8, alpha=16)

    # DPO: one adapter, one epoch of listwise (Plackett-Luce) DPO
    encoded = encode_records(tokenizer, records, max_length=64, max_prompt_length=16)
    policy, _ = em_dpo.add_type_adapters(copy.deepcopy(base), lora, 1)
    t = time.perf_counter()
    with policy.disable_adapter():
        precompute_reference_logps(policy, encoded, batch_size=64, pad_token_id=pad)
    reference_s = time.perf_counter() - t
    t = time.perf_counter()
    fit(
        policy,
        encoded,
        lambda items: collate(items, pad),
        make_step(PreferenceLoss(LossConfig(name="plackett_luce"))),
        train_cfg,
        accelerator=accelerator,
    )
    dpo_s = time.perf_counter() - t

    # EM: the same records; one iteration = M-step + E-step, timed apart
    model, adapters = em_dpo.add_type_adapters(copy.deepcopy(base), lora, args.types)
    names, index = em_dpo.annotator_index(records)
    gamma = np.random.default_rng(0).dirichlet(np.ones(args.types), size=len(names))
    halves = em_dpo.record_halves(index)
    fit_half, score_half = (None, None) if args.no_holdout else ((halves != 1), (halves != 0))
    t = time.perf_counter()
    items = em_dpo.m_step_items(encoded, index, gamma, args.m_step, np.random.default_rng(0), fit_half)
    fit(
        model,
        items,
        em_dpo.make_collate(pad),
        em_dpo.make_step(adapters, 0.1),
        dataclasses.replace(train_cfg),
        accelerator=accelerator,
    )
    m_step_s = time.perf_counter() - t
    t = time.perf_counter()
    em_dpo.type_rewards(model, encoded, adapters, 0.1, pad, 64, score_half)
    e_step_s = time.perf_counter() - t
    result = {
        "records": len(records),
        "annotators": len(names),
        "types": args.types,
        "m_step": args.m_step,
        "holdout": not args.no_holdout,
        "threads": torch.get_num_threads(),
        "reference_logps_s": round(reference_s, 2),
        "dpo_epoch_s": round(dpo_s, 2),
        "em_m_step_s": round(m_step_s, 2),
        "em_e_step_s": round(e_step_s, 2),
        "em_iteration_s": round(m_step_s + e_step_s, 2),
        "ratio_em_iteration_to_dpo_epoch": round((m_step_s + e_step_s) / dpo_s, 2),
        "ratio_m_step_to_dpo_epoch": round(m_step_s / dpo_s, 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
