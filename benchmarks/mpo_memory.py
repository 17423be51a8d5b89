"""Peak resident memory of one MPO training step vs one DPO step with a live frozen reference (CPU).

    OMP_NUM_THREADS=1 python benchmarks/mpo_memory.py                  # ~30M-parameter GPT-2, 1 pair x 64 tokens
    OMP_NUM_THREADS=1 python benchmarks/mpo_memory.py --batch 4 --seq 128  # activations dominate

Each method runs in its own subprocess (so one's peak does not hide the other's), on the same model config
and the same preference batch: forward + backward + AdamW step, as `train.fit` does. DPO keeps a frozen
deep copy of the policy as the reference (reference strategy "frozen"); MPO has no reference, but its batch
also holds one regularization sample per pair. Peak RSS is `ru_maxrss` of the child process; "step" is the
peak minus the RSS right after imports.

What to expect: with the models dominating (small batch) DPO holds two models' weights and MPO one, so the
RSS with the model(s) loaded differs by one model; the step peak differs by about one model too (both
hold the policy's gradients and AdamW moments, 3 more model-sized buffers). With large batches the
activations dominate and MPO's extra regularization sequence per pair (1.5x the sequences) can outweigh
the saved reference.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from prefalign.core.logprobs import EncodedRecord, collate
    from prefalign.core.reference import live_reference
    from prefalign.methods import dpo, mpo

    torch.set_num_threads(1)
    after_imports = rss_mb()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=args.vocab,
        n_positions=args.seq,
        n_embd=args.embd,
        n_layer=args.layers,
        n_head=max(1, args.embd // 64),
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    policy = GPT2LMHeadModel(config).train()
    n_params = sum(p.numel() for p in policy.parameters())
    prompt_len, response_len = args.seq // 4, args.seq - args.seq // 4

    def record(n_responses):
        ids = lambda n: torch.randint(2, args.vocab, (n,)).tolist()  # noqa: E731
        return EncodedRecord(
            ids(prompt_len), [ids(response_len) for _ in range(n_responses)], list(range(n_responses))
        )

    pairs = [record(2) for _ in range(args.batch)]
    if args.mode == "dpo":
        reference_fn = live_reference("frozen", policy)  # a frozen deep copy: the second model
        step = dpo.make_step(dpo.PreferenceLoss(dpo.LossConfig(name="dpo")), reference_fn)
        batch = collate(pairs, 0)
    else:
        step = mpo.make_step(mpo.LossConfig())
        batch = mpo.collate_mpo([(p, record(1), None) for p in pairs], 0)
    after_models = rss_mb()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    for _ in range(args.steps):
        loss, _ = step(policy, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {
        "mode": args.mode,
        "params_M": n_params / 1e6,
        "model_MB": n_params * 4 / 2**20,
        "after_imports_MB": after_imports,
        "after_models_MB": after_models,
        "peak_MB": rss_mb(),
        "sequences_per_batch": int(batch["input_ids"].shape[0]),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--embd", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1, help="preference pairs per step")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--mode", choices=["dpo", "mpo"], help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(child(args)))
        return
    results = {}
    for mode in ("dpo", "mpo"):
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--mode", mode],
            check=True,
            capture_output=True,
            text=True,
        )
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    d, m = results["dpo"], results["mpo"]
    print(
        f"model: GPT-2 {args.layers} layers x {args.embd}, vocab {args.vocab}: {d['params_M']:.1f}M params "
        f"= {d['model_MB']:.0f} MB of float32 weights; {args.batch} pairs of {args.seq} tokens, {args.steps} steps"
    )
    print(f"{'':28}{'DPO + frozen ref':>18}{'MPO':>12}{'MPO / DPO':>12}")
    rows = [
        ("sequences per batch", "sequences_per_batch"),
        ("RSS after imports (MB)", "after_imports_MB"),
        ("RSS with model(s) (MB)", "after_models_MB"),
        ("peak RSS (MB)", "peak_MB"),
    ]
    for label, key in rows:
        print(f"{label:28}{d[key]:>18.0f}{m[key]:>12.0f}{m[key] / d[key]:>12.2f}")
    d_step, m_step = d["peak_MB"] - d["after_imports_MB"], m["peak_MB"] - m["after_imports_MB"]
    print(f"{'peak - imports (MB)':28}{d_step:>18.0f}{m_step:>12.0f}{m_step / d_step:>12.2f}")
    print(
        f"DPO - MPO peak: {d['peak_MB'] - m['peak_MB']:.0f} MB (one model's weights: {d['model_MB']:.0f} MB)"
    )


if __name__ == "__main__":
    main()
