"""One DPO runner on a GPU, timed: step time, tokens/s, peak GPU memory, MFU (see gpu_check.sh).

A random Qwen2-style model built from config (default: the Qwen2.5-0.5B shape, 494M parameters, vocabulary
151,936), prompts of 512 tokens and responses of 256, 16 pairs per step, reference log-probs precomputed,
AdamW. Weights float32 with bf16 autocast (prefalign `train.mixed_precision: bf16`, TRL `bf16=True`).

  tokens/s  = tokens of every candidate sequence (prompt + response, per candidate) per second of step
  MFU       = 6 x parameters x those tokens / step time / the GPU's peak dense bf16 FLOP/s
              (a packed layout that computes each prompt once needs fewer FLOPs for the same tokens, so its
              MFU by this definition can be higher than what its kernels achieve)

usage: python benchmarks/gpu_check.py RUNNER [--steps 8] [--warmup 2] [--dry-run]
  RUNNER: "prefalign packed" | "prefalign padded" | "TRL"; under torchrun, prefalign runs DDP (or FSDP2
  with ACCELERATE_USE_FSDP=true FSDP_VERSION=2); --dry-run: a tiny model on CPU, to check the script.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dpo_vs_trl import build_tokenizer, make_records  # noqa: E402

from prefalign.core.logprobs import encode_records  # noqa: E402

QWEN05 = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936)
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=4096)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def peak_flops() -> float | None:
    if os.environ.get("PEAK_TFLOPS"):
        return float(os.environ["PEAK_TFLOPS"]) * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def make_model(size: dict, vocab: int, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab, hidden_size=size["hidden"], intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"],
        max_position_embeddings=4096, tie_word_embeddings=True, attention_dropout=0.0,
        eos_token_id=1, pad_token_id=0, bos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    attn = "flash_attention_2" if _has_flash() and device != "cpu" else "sdpa"
    model.config._attn_implementation = attn
    return model


def _has_flash() -> bool:
    try:
        import flash_attn  # noqa: F401 - optional

        return True
    except ImportError:
        return False


def run_prefalign(args, size, shape, records, tokenizer, device, packing: bool):
    from prefalign.core.reference import precompute_reference_logps
    from prefalign.core.train import TrainConfig, fit
    from prefalign.methods import dpo

    model = make_model(size, shape["vocab"], device)  # padded: the model's own attention (flash if installed)
    encoded = encode_records(tokenizer, records, max_length=1024, max_prompt_length=512)
    precompute_reference_logps(model, encoded, batch_size=args.batch, pad_token_id=0)
    stamps = []
    step = dpo.make_step(dpo.PreferenceLoss(dpo.LossConfig(name="dpo", beta=0.1)))

    def collate_fn(items):
        if device != "cpu":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        from prefalign.core.logprobs import collate

        return collate(items, 0, packed=packing)

    cfg = TrainConfig(
        output_dir="", max_steps=args.warmup + args.steps + 1, batch_size=args.batch, learning_rate=1e-6,
        lr_scheduler="constant", log_every=1, progress=False, shuffle=False,
        mixed_precision="no" if args.dry_run else "bf16", gradient_checkpointing=args.gradient_checkpointing,
    )  # fmt: skip
    result = fit(model, encoded, collate_fn, step, cfg)
    return stamps, result.accelerator.num_processes


def run_trl(args, size, shape, records, tokenizer, device):
    import tempfile

    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    rows = [{"prompt": r.prompt, "chosen": r.responses[0], "rejected": r.responses[1]} for r in records]
    stamps = []

    class Stamp(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if device != "cpu":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        config = trl.DPOConfig(
            output_dir=tmp, per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps + 1,
            learning_rate=1e-6, lr_scheduler_type="constant", beta=0.1, max_length=1024,
            precompute_ref_log_probs=True, precompute_ref_batch_size=args.batch, logging_steps=1, save_strategy="no",
            report_to=[], use_cpu=device == "cpu", dataloader_num_workers=0, disable_tqdm=True, seed=0,
            bf16=not args.dry_run, gradient_checkpointing=args.gradient_checkpointing,
        )  # fmt: skip
        trainer = trl.DPOTrainer(
            model=make_model(size, shape["vocab"], device), args=config, train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer, callbacks=[Stamp()],
        )  # fmt: skip
        trainer.remove_callback(PrinterCallback)
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
        trainer.train()
    return stamps, 1


def correctness(device: str) -> None:
    """The packed layout on this device (flex_attention compiled on CUDA) against the naive computation
    (batch 1, eager attention, log_softmax): log-probs and gradients, on a sliding-window Mistral, Qwen2 with
    per-layer windows, Gemma2 with softcapping, Llama. Raises on a mismatch."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from packing_models import build, naive_matrix, records  # tests/packing_models.py
    from prefalign.core.logprobs import collate_packed, sequence_logps

    for arch in ("llama", "mistral", "qwen2", "gemma2", "gemma3"):
        model = build(arch).to(device).train()
        data = records()
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate_packed(data).items()}
        logps, _ = sequence_logps(model, batch)
        weights = torch.randn(logps.shape, generator=torch.Generator().manual_seed(0)).to(device)
        model.zero_grad()
        (logps * weights).sum().backward()
        g_packed = torch.cat([p.grad.flatten() for p in model.parameters()])
        model.zero_grad()
        naive = naive_matrix_on(model, data, device, naive_matrix)
        total = sum(weights[b, j] * v for b, row in enumerate(naive) for j, v in enumerate(row))
        total.backward()
        g_naive = torch.cat([p.grad.flatten() for p in model.parameters()])
        err = max(
            abs(float(logps[b, j]) - float(v)) for b, row in enumerate(naive) for j, v in enumerate(row)
        )
        rel = float((g_packed - g_naive).norm() / g_naive.norm())
        print(
            json.dumps({"correctness": arch, "logp_err": err, "grad_rel_err": rel, "device": device}),
            flush=True,
        )
        if not (err < 1e-3 and rel < 1e-3):
            raise SystemExit(f"packed layout on {device} differs from the naive computation for {arch}")


def naive_matrix_on(model, data, device, naive_matrix):
    """tests' naive_matrix builds CPU tensors: run it with CUDA as the default device."""
    with torch.device(device):
        return naive_matrix(model, data)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runner", choices=["prefalign packed", "prefalign padded", "TRL", "correctness"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="pairs per step per process")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="tiny model, CPU, short sequences")
    args = parser.parse_args()
    if args.runner == "correctness":
        return correctness("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        args.prompt, args.response, args.batch, args.steps, args.warmup = 24, 12, 2, 2, 1
    size = TINY if args.dry_run else QWEN05
    device = "cpu" if args.dry_run else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if device != "cpu":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    shape = dict(
        vocab=size["vocab"], prompt=(args.prompt, args.prompt), response=(args.response, args.response)
    )
    tokenizer = build_tokenizer(size["vocab"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    records = make_records(shape, args.batch * world * (args.warmup + args.steps + 1))
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    if args.runner == "TRL":
        stamps, processes = run_trl(args, size, shape, records, tokenizer, device)
    else:
        stamps, processes = run_prefalign(
            args, size, shape, records, tokenizer, device, args.runner.endswith("packed")
        )
    times = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup :]
    step = sorted(times)[len(times) // 2]
    n_params = sum(p.numel() for p in make_model(size, size["vocab"], "meta").parameters())
    tokens = args.batch * processes * 2 * (args.prompt + args.response + 1)  # + EOS per response
    peak = peak_flops()
    out = {
        "runner": args.runner,
        "processes": processes,
        "fsdp": os.environ.get("ACCELERATE_USE_FSDP", "false"),
        "params_M": round(n_params / 1e6, 1),
        "step_s_median": round(step, 4),
        "step_s_min_max": [round(min(times), 4), round(max(times), 4)],
        "tokens_per_s": round(tokens / step),
        "peak_gpu_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device != "cpu" else None,
        "mfu": round(6 * n_params * tokens / step / peak, 4) if peak else None,
        "device": torch.cuda.get_device_name() if device != "cpu" else "cpu (dry run)",
    }
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
