"""DPO step time and memory: prefalign vs TRL vs two plain-transformers floors, interleaved step by step.

Every runner is a real training loop (prefalign's `core.train.fit`, TRL's `DPOTrainer`) or a floor written
in plain transformers; all see the same batches of the same data from the same initial weights (float32,
dropout 0, reference log-probs precomputed). Each runner's loop runs in its own thread and is let through
ONE optimizer step at a time; every round the runners take their step in a random order, so a change of
machine load hits them all alike. A step is timed from its release to the start of the next one (collate,
forward, backward, clipping, AdamW, logging). Reported: median and quartiles over the timed rounds.

Floors (forward + one backward of the policy's response log-probs, no optimizer step, no library loop):
  - per-sequence: each prompt + response forwarded alone (batch 1, no padding), full logits;
  - shared-prompt: each prompt forwarded once, each response continued from the prompt's KV cache, logits
    only at response positions: what prefalign's packed layout computes, written naively.

Shapes (`--shapes`): tiny (0.8M GPT-2, 32-128-token prompts and responses), small (~4M, 32 + 64),
medium (~30M, 32 + 64), long (small model, 256-token prompts + 128-token responses), listwise (small,
4 candidates ranked; TRL and the "pairs" runner train all 6 implied pairs), vocab (Qwen2-style, 151,936-token
vocabulary). Knob rows on `small` (`--knobs`): the loop attention path, gradient checkpointing, bf16 autocast
(on CPU: informational; the GPU figure is benchmarks/gpu_check.sh), torch.compile.
`--memory`: each runner alone in a fresh process, peak resident memory of its steps above the memory before
them (sampled every ms).

TRL is NOT a dependency of prefalign: it lives in a separate environment, see benchmarks/README.md.
    OMP_NUM_THREADS=1 .venv-bench/bin/python benchmarks/dpo_vs_trl.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dpo_vs_trl.py --skip-trl --shapes tiny
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars of reference precompute and dataset maps
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from prefalign.core.data import PreferenceRecord
from prefalign.core.logprobs import collate, encode_records
from prefalign.core.reference import precompute_reference_logps
from prefalign.core.train import TrainConfig, fit
from prefalign.methods import dpo

SHAPES = {
    "tiny": dict(
        arch="gpt2", layers=2, hidden=128, heads=4, vocab=2048, prompt=(32, 128), response=(32, 128)
    ),
    "small": dict(arch="gpt2", layers=4, hidden=256, heads=4, vocab=2048, prompt=(32, 32), response=(64, 64)),
    "medium": dict(
        arch="gpt2", layers=6, hidden=512, heads=8, vocab=8192, prompt=(32, 32), response=(64, 64)
    ),
    "long": dict(
        arch="gpt2", layers=4, hidden=256, heads=4, vocab=2048, prompt=(256, 256), response=(128, 128)
    ),
    "listwise": dict(
        arch="gpt2",
        layers=4,
        hidden=256,
        heads=4,
        vocab=2048,
        prompt=(32, 32),
        response=(64, 64),
        candidates=4,
    ),
    "vocab": dict(
        arch="qwen2", layers=2, hidden=64, heads=4, vocab=151936, prompt=(32, 64), response=(64, 128)
    ),
}
RUNNERS = ["floor/per-sequence", "floor/shared-prompt", "prefalign packed", "prefalign padded", "TRL"]
KNOBS = [
    "prefalign packed (loop path)",
    "prefalign packed + grad ckpt",
    "prefalign packed + bf16",
    "prefalign packed + compile",
]


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Word-level: word i is token i, so a text of k words is exactly k tokens for every runner."""
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", *(f"w{i}" for i in range(vocab_size - 2))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def make_records(shape: dict, n: int, seed: int = 0) -> list[PreferenceRecord]:
    g = torch.Generator().manual_seed(seed)

    def text(lo, hi):
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return " ".join(f"w{i}" for i in torch.randint(0, shape["vocab"] - 2, (k,), generator=g).tolist())

    k = shape.get("candidates", 2)
    # responses start with a space: TRL joins prompt + response text before tokenizing
    return [
        PreferenceRecord(
            text(*shape["prompt"]), [" " + text(*shape["response"]) for _ in range(k)], list(range(k))
        )
        for _ in range(n)
    ]


def implied_pairs(records):
    """A ranking's implied pairs (every better candidate over every worse one): 6 for a ranking of 4."""
    return [
        PreferenceRecord.pair(r.prompt, r.responses[a], r.responses[b])
        for r in records
        for i, a in enumerate(r.ranking)
        for b in r.ranking[i + 1 :]
    ]


def make_model(shape: dict, tokenizer):
    torch.manual_seed(0)
    ids = dict(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    if shape["arch"] == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=512, n_embd=shape["hidden"], n_layer=shape["layers"],
            n_head=shape["heads"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids,
        )  # fmt: skip
        return GPT2LMHeadModel(config)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=shape["hidden"], intermediate_size=4 * shape["hidden"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=max(1, shape["heads"] // 2),
        max_position_embeddings=1024, tie_word_embeddings=False, **ids,
    )  # fmt: skip
    return Qwen2ForCausalLM(config)


# ------------------------------------------------------------------ one step at a time


class Gate:
    """Lets a training loop running in its own thread through one step at a time."""

    def __init__(self, target):
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.error = None

        def body():
            try:
                target(self.at_step_start)
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                self.error = e
            finally:
                self.finished = True
                self.done.release()

        self.finished = False
        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()
        self.done.acquire()  # set-up finished (model, data, reference log-probs): the loop is at step 1
        self._raise()

    def at_step_start(self):  # called by the loop, in its thread
        self.done.release()
        self.go.acquire()

    def step(self) -> float:
        start = time.perf_counter()
        self.go.release()
        self.done.acquire()
        self._raise()
        return time.perf_counter() - start

    def _raise(self):
        if self.error is not None:
            raise RuntimeError(f"runner failed: {self.error!r}") from self.error


def prefalign_loop(shape, records, tokenizer, steps, batch, packing=True, knob=None):
    def target(at_step_start):
        model = make_model(shape, tokenizer)
        loss = dpo.PreferenceLoss(
            dpo.LossConfig(name="plackett_luce" if shape.get("candidates", 2) > 2 else "dpo", beta=0.1)
        )
        encoded = encode_records(tokenizer, records, max_length=1024, max_prompt_length=512)
        precompute_reference_logps(model, encoded, batch_size=batch, pad_token_id=tokenizer.pad_token_id)
        if knob == "compile":
            model = torch.compile(model, dynamic=True)
        pad = tokenizer.pad_token_id

        def collate_fn(items):
            at_step_start()
            return collate(items, pad, packed=packing)

        cfg = TrainConfig(
            output_dir="", max_steps=steps, batch_size=batch, learning_rate=1e-5, lr_scheduler="constant",
            log_every=1, progress=False, shuffle=False, gradient_checkpointing=knob == "grad_ckpt",
        )  # fmt: skip
        step = dpo.make_step(loss)
        if (
            knob == "bf16"
        ):  # what train.mixed_precision: bf16 does (accelerate keeps ONE precision per process)

            def step(model, batch, plain=step):
                with torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16):
                    return plain(model, batch)

        fit(model, encoded, collate_fn, step, cfg)

    return target


def trl_loop(shape, records, tokenizer, steps, batch):
    import trl  # the benchmark environment only
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    rows = [
        {"prompt": r.prompt, "chosen": r.responses[r.ranking[0]], "rejected": r.responses[r.ranking[1]]}
        for r in records
    ]

    def target(at_step_start):
        class Stamp(TrainerCallback):
            def on_step_begin(self, *a, **k):
                at_step_start()

        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            config = trl.DPOConfig(
                output_dir=tmp, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-5,
                lr_scheduler_type="constant", beta=0.1, max_length=1024, precompute_ref_log_probs=True,
                precompute_ref_batch_size=batch, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                dataloader_num_workers=0, disable_tqdm=True, seed=0,
                bf16=False, gradient_checkpointing=False,  # TRL's defaults turn both on; compare float32 to float32
            )  # fmt: skip
            trainer = trl.DPOTrainer(
                model=make_model(shape, tokenizer), args=config, train_dataset=Dataset.from_list(rows),
                processing_class=tokenizer, callbacks=[Stamp()],
            )  # fmt: skip
            trainer.remove_callback(PrinterCallback)  # its per-step log lines
            # the same batches in the same order as the other runners (prefalign's runs use shuffle=False)
            trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(
                trainer.train_dataset
            )
            trainer.train()

    return target


def floor_loop(shape, records, tokenizer, steps, batch, shared_prompt):
    """Plain transformers: response log-probs of every candidate, forward + one backward, no optimizer."""

    def target(at_step_start):
        model = make_model(shape, tokenizer).train()
        encoded = encode_records(tokenizer, records, max_length=1024, max_prompt_length=512)
        for s in range(steps):
            at_step_start()
            total = 0.0
            for r in encoded[s * batch : (s + 1) * batch]:
                if shared_prompt:
                    total = total + _shared_prompt_logps(model, r.prompt_ids, r.response_ids)
                else:
                    for y in r.response_ids:
                        ids = torch.tensor([r.prompt_ids + y])
                        logp = torch.log_softmax(
                            model(input_ids=ids, use_cache=False)
                            .logits[0, len(r.prompt_ids) - 1 : -1]
                            .float(),
                            -1,
                        )
                        total = total + logp.gather(-1, torch.tensor(y)[:, None]).sum()
            total.backward()
            model.zero_grad(set_to_none=True)

    return target


def _shared_prompt_logps(model, prompt, responses):
    n = len(prompt)
    out = model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
    cache, first = out.past_key_values, out.logits[0, -1].float().log_softmax(-1)
    total = 0.0
    for y in responses:
        fresh = DynamicCache()
        for layer, entry in enumerate(cache.layers):
            fresh.update(entry.keys, entry.values, layer)
        ids = torch.tensor([y[:-1]]) if len(y) > 1 else None
        total = total + first[y[0]]
        if ids is not None:
            positions = torch.arange(n, n + len(y) - 1)[None]
            logits = model(input_ids=ids, cache=fresh, position_ids=positions, use_cache=True).logits[0]
            total = total + logits.float().log_softmax(-1).gather(-1, torch.tensor(y[1:])[:, None]).sum()
    return total


def runner_target(name, shape, records, tokenizer, steps, batch):
    listwise = shape.get("candidates", 2) > 2
    pairs = implied_pairs(records) if listwise else records
    if name == "floor/per-sequence":
        return floor_loop(shape, records, tokenizer, steps, batch, shared_prompt=False)
    if name == "floor/shared-prompt":
        return floor_loop(shape, records, tokenizer, steps, batch, shared_prompt=True)
    if name == "prefalign packed":
        return prefalign_loop(shape, records, tokenizer, steps, batch)
    if name == "prefalign padded":
        return prefalign_loop(shape, records, tokenizer, steps, batch, packing=False)
    if name == "prefalign pairs":  # listwise data trained as all implied pairs
        return prefalign_loop(shape, pairs, tokenizer, steps, batch * 6)
    if name == "TRL":  # listwise: all implied pairs, 6 per record
        return trl_loop(shape, pairs, tokenizer, steps, batch * (6 if listwise else 1))
    if name == "prefalign packed (loop path)":  # the path is read at each forward: see _with_path
        return prefalign_loop(shape, records, tokenizer, steps, batch)
    knob = {
        "prefalign packed + grad ckpt": "grad_ckpt",
        "prefalign packed + bf16": "bf16",
        "prefalign packed + compile": "compile",
    }
    return prefalign_loop(shape, records, tokenizer, steps, batch, knob=knob[name])


def interleaved(names, shape, tokenizer, args, seed=0):
    """{runner: [step seconds of the timed rounds]}, runners released one step at a time in random order."""
    n_steps = args.warmup + args.steps + 1  # the last step also runs the loop's ending: not timed
    records = make_records(shape, args.batch_size * n_steps)
    gates = {}
    for name in names:
        try:
            gates[name] = Gate(runner_target(name, shape, records, tokenizer, n_steps, args.batch_size))
        except (ImportError, RuntimeError) as e:
            print(f"  {name}: skipped ({e})", flush=True)
    times = {name: [] for name in gates}
    rng = random.Random(seed)
    for round_ in range(args.warmup + args.steps):
        order = list(gates)
        rng.shuffle(order)
        for name in order:
            t = _with_path(name, gates[name].step)
            if round_ >= args.warmup:
                times[name].append(t)
    for gate in gates.values():  # let every loop finish
        if not gate.finished:
            gate.step()
    return times


def _with_path(name, fn):
    """The packed attention path is read from the environment at each packed forward: set it per runner."""
    os.environ.pop("PREFALIGN_PACKED_ATTENTION", None)
    if name == "prefalign packed (loop path)":
        os.environ["PREFALIGN_PACKED_ATTENTION"] = "loop"
    return fn()


def quartiles(xs):
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


def report(shape_name, shape, times, reference_names):
    model = make_model(shape, build_tokenizer(shape["vocab"]))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"\n## {shape_name}: {shape['arch']} {shape['layers']}x{shape['hidden']}, {params:.1f}M params, vocab "
        f"{shape['vocab']}; prompts {shape['prompt']}, responses {shape['response']} tokens, "
        f"{shape.get('candidates', 2)} candidates"
    )
    medians = {name: statistics.median(t) for name, t in times.items() if t}
    print(
        "| runner | median s [q1, q3] | "
        + " | ".join(f"/ {r}" for r in reference_names if r in medians)
        + " |"
    )
    print("|---|---|" + "---|" * sum(r in medians for r in reference_names))
    for name, t in times.items():
        if not t:
            continue
        q1, med, q3 = quartiles(t)
        ratios = " | ".join(f"{med / medians[r]:.2f}" for r in reference_names if r in medians)
        print(f"| {name} | {med:.4f} [{q1:.4f}, {q3:.4f}] | {ratios} |", flush=True)
    return {name: quartiles(t) for name, t in times.items() if t}


# ------------------------------------------------------------------ memory: one runner per process


def memory_one(name, shape_name, args):
    shape = SHAPES[shape_name]
    tokenizer = build_tokenizer(shape["vocab"])
    n_steps = 3
    records = make_records(shape, args.batch_size * (n_steps + 1))
    peak = {"rss": 0}
    gate = Gate(runner_target(name, shape, records, tokenizer, n_steps + 1, args.batch_size))
    base = _rss()
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], _rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(n_steps):
        _with_path(name, gate.step)
    stop.set()
    sampler.join()
    print(json.dumps({"runner": name, "shape": shape_name, "step_peak_mib": (peak["rss"] - base) / 2**20}))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_table(names, shape_names, args):
    print("\n## peak memory of the steps above the memory before them (MiB, one process per runner)")
    print("| shape | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for shape_name in shape_names:
        cells = []
        for name in names:
            cmd = [
                sys.executable,
                __file__,
                "--memory-one",
                name,
                "--shapes",
                shape_name,
                "--batch-size",
                str(args.batch_size),
            ]
            out = subprocess.run(
                cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
            )
            lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
            cells.append(f"{json.loads(lines[-1])['step_peak_mib']:.0f}" if lines else "failed")
        print(f"| {shape_name} | " + " | ".join(cells) + " |", flush=True)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="tiny,small,medium,long,listwise,vocab")
    parser.add_argument("--batch-size", type=int, default=8, help="records per step")
    parser.add_argument("--steps", type=int, default=15, help="timed rounds (after warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--knobs", action="store_true", help="also the knob rows, on the small shape")
    parser.add_argument("--memory", action="store_true", help="peak memory per runner instead of times")
    parser.add_argument("--memory-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape_names = args.shapes.split(",")
    names = [n for n in RUNNERS if not (args.skip_trl and n == "TRL")]
    if args.memory_one:
        return memory_one(args.memory_one, shape_names[0], args)
    if args.memory:
        return memory_table(names, shape_names, args)
    print(
        f"float32, CPU, {args.threads} thread(s), batch {args.batch_size} records; median [quartiles] of "
        f"{args.steps} interleaved rounds after {args.warmup}; torch {torch.__version__}"
    )
    for shape_name in shape_names:
        shape = SHAPES[shape_name]
        run = list(names)
        if shape.get("candidates", 2) > 2:
            run.insert(3, "prefalign pairs")
        if args.knobs and shape_name == "small":
            run += KNOBS
        times = interleaved(run, shape, build_tokenizer(shape["vocab"]), args)
        report(
            shape_name, shape, times, ["TRL", "floor/per-sequence", "floor/shared-prompt", "prefalign packed"]
        )


if __name__ == "__main__":
    main()
