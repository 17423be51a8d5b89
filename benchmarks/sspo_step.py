"""SSPO step time over Diffusion-DPO step time, and the extra memory of SSPO's checkpoint bank (CPU).

    OMP_NUM_THREADS=1 python benchmarks/sspo_step.py                      # digits-size UNet (16, 32), batch 32
    OMP_NUM_THREADS=1 python benchmarks/sspo_step.py --channels 32 64 --batch 64 --lora-rank 4

One step = forward + backward + AdamW update on the same batch shapes, as `train.fit` runs it.
Diffusion-DPO: policy and frozen reference on [winner; loser]. SSPO: the same two forwards on
[winner; x_ref] plus, on a cache miss, x_ref sampled by the drawn checkpoint (`--ref-steps` DDIM steps).
"SSPO cached" is the steady state where every (snapshot, row) x_ref is already in the cache; "uncached"
samples x_ref every step (`reference_sample.cache: false`). The bank holds K copies of the trainable
parameters (adapters only with LoRA) on CPU.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--channels", type=int, nargs=2, default=[16, 32])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ref-steps", type=int, default=10)
    parser.add_argument("--bank-size", type=int, default=7)
    parser.add_argument("--lora-rank", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from prefalign.core import images
    from prefalign.core.checkpoint import trainable_state
    from prefalign.core.config import build
    from prefalign.methods import diffusion_dpo, sspo
    from prefalign.worlds import digits_ddpm

    torch.manual_seed(0)
    ddpm = digits_ddpm.DigitsDDPMConfig(channels=tuple(args.channels))
    scheduler = digits_ddpm.build_scheduler(ddpm)
    n_rows = args.batch * 4
    data = {
        "chosen": torch.rand(n_rows, 1, 8, 8) * 2 - 1,
        "rejected": torch.rand(n_rows, 1, 8, 8) * 2 - 1,
        "context": torch.arange(n_rows) % 10,
    }
    dataset = images.ImageDataset(data)
    batches = [
        images.collate_images([dataset[i] for i in range(k, k + args.batch)])
        for k in range(0, n_rows, args.batch)
    ]

    def fresh_model():
        torch.manual_seed(0)
        unet = digits_ddpm.build_digits_unet(ddpm)
        if args.lora_rank:
            from peft import LoraConfig, inject_adapter_in_model

            unet.requires_grad_(False)
            unet = inject_adapter_in_model(
                LoraConfig(r=args.lora_rank, target_modules=["conv1", "conv2"]), unet
            )
        return unet.train()

    def timed(model, step, n) -> float:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        start = time.perf_counter()
        for i in range(n):
            loss, _ = step(model, batches[i % len(batches)])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return (time.perf_counter() - start) / n * 1000

    results = {}
    unet = fresh_model()
    dpo_step = diffusion_dpo.make_step(scheduler, diffusion_dpo.make_reference(unet, "frozen"), beta=2000.0)
    timed(unet, dpo_step, 2)  # warm-up
    results["diffusion_dpo"] = timed(unet, dpo_step, args.steps)

    for cached in (False, True):
        unet = fresh_model()
        cfg = build(sspo.Config, {
            "model": {"name_or_path": "unused"}, "data": {"train": "unused"}, "loss": {"beta": 2000.0},
            "sspo": {"bank": {"size": args.bank_size, "save_every": 10**9},
                     "reference_sample": {"steps": args.ref_steps, "cache": cached}},
        })  # fmt: skip
        state = sspo.SSPOState(unet, cfg, 1)
        for k in range(1, args.bank_size):  # a full bank of distinct snapshots
            with torch.no_grad():
                for p in unet.parameters():
                    if p.requires_grad:
                        p.add_(1e-3 * torch.randn_like(p))
            state.bank.ids.append(k)
            state.bank.entries.append(trainable_state(unet))
        if cached:  # steady state: every snapshot has sampled every row once
            for position, snapshot_id in enumerate(state.bank.ids):
                net = state.reference.load(state.bank, position)
                for batch in batches:
                    sspo.reference_samples(net, scheduler, batch["context"], batch["index"], snapshot_id,
                                           cfg.sspo.reference_sample, 0, state.cache)  # fmt: skip
        step = sspo.make_step(scheduler, state, cfg)
        timed(unet, step, 2)
        results["sspo_cached" if cached else "sspo_uncached"] = timed(unet, step, args.steps)
        bank_bytes = state.bank.nbytes()
        cache_bytes = sum(x.numel() * x.element_size() for x in (state.cache or {}).values())

    model_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    print(f"UNet channels {tuple(args.channels)}, {model_bytes / 1e6:.2f} MB of weights, batch {args.batch}, "
          f"x_ref: {args.ref_steps} DDIM steps, bank K={args.bank_size}, LoRA rank {args.lora_rank}")  # fmt: skip
    print("| method | ms / step | vs Diffusion-DPO |\n|---|---|---|")
    for name, ms in results.items():
        print(f"| {name} | {ms:.1f} | {ms / results['diffusion_dpo']:.2f}x |")
    print(f"checkpoint bank: {bank_bytes / 1e6:.2f} MB on CPU ({bank_bytes / model_bytes:.2f}x the model's weights); "
          f"x_ref cache for {n_rows} rows: {cache_bytes / 1e6:.3f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
