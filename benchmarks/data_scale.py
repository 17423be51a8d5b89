"""Data at scale: a generated N-row preference file (jsonl and parquet) and an image-pair table, through the
run's data path (core/data_arrow.py, core/encode_arrow.py, the latent cache of core/conditioning.py).

Each measurement runs in a fresh child process (its own peak RSS, ru_maxrss) against its own data cache:
  read+validate   load_records (stream the file, validate every row, write the Arrow records file)
  tokenize        encode_data on the loaded records (Dataset.map, batched, into the cached Arrow file)
  first step      `prefalign.run` of DPO on a tiny GPT-2 (frozen reference: no precompute over N rows),
                  max_steps 1: process start to the end of the first optimizer step
  cached          the same three again: the records and token ids come from the cache
  loader          steps/s of a tiny model's DPO step fed by torch's DataLoader over the EncodedSet with 0 and
                  2 workers (core/train.fit has no workers yet: that is the dist branch's; this measures the
                  dataset contract it relies on: len(), dataset[i], picklable)
  images          an image-pair table (parquet, PNG bytes embedded): load + latent cache (stand-in VAE), cold
                  and cached

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_scale.py --rows 1000000 10000   # table rows below
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_scale.py --rows 10000 --images 1000  # a smoke run

Writes benchmarks/data_scale-<rows>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLD_FIRST_STEP_ROWS = 100_000  # a cold first step repeats the cold load and tokenize: measured up to this size


def words():
    from prefalign.worlds.reviews_grammar import vocabulary

    return [w for w in vocabulary() if w.isalpha()]


def make_preferences(folder: Path, n: int, seed: int = 0) -> dict[str, Path]:
    """n distinct prompt/chosen/rejected rows of the reviews vocabulary (8-word prompts, 10-20-word responses),
    as jsonl and parquet, written in blocks (memory does not grow with n)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng, vocab = random.Random(seed), words()
    jsonl, parquet = folder / f"prefs-{n}.jsonl", folder / f"prefs-{n}.parquet"
    if jsonl.exists() and parquet.exists():
        return {"jsonl": jsonl, "parquet": parquet}
    schema = pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string())])
    with jsonl.open("w") as f, pq.ParquetWriter(parquet, schema) as writer:
        for start in range(0, n, 50_000):
            block = []
            for i in range(start, min(n, start + 50_000)):
                text = [" ".join(rng.choices(vocab, k=rng.randint(10, 20))) for _ in range(2)]
                block.append(
                    {
                        "prompt": f"review {i} " + " ".join(rng.choices(vocab, k=8)),
                        "chosen": text[0],
                        "rejected": text[1] + " .",
                    }
                )
            f.write("".join(json.dumps(r) + "\n" for r in block))
            writer.write_table(pa.Table.from_pylist(block, schema=schema))
    return {"jsonl": jsonl, "parquet": parquet}


def make_images(folder: Path, n: int, seed: int = 0) -> Path:
    """An n-row image-pair table in Pick-a-Pic's layout (jpg_0, jpg_1, label_0, caption): 16x16 RGB PNGs embedded
    as bytes, and a class label (the stand-in model is class-conditional)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    path = folder / f"images-{n}.parquet"
    if path.exists():
        return path
    rng = np.random.default_rng(seed)

    def png():
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    schema = pa.schema(
        [
            ("caption", pa.string()),
            ("jpg_0", pa.binary()),
            ("jpg_1", pa.binary()),
            ("label_0", pa.int64()),
            ("label", pa.int64()),
        ]
    )
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, 10_000):
            k = min(n, start + 10_000) - start
            rows = {"caption": [f"image {start + i}" for i in range(k)], "jpg_0": [png() for _ in range(k)],
                    "jpg_1": [png() for _ in range(k)], "label_0": [int(x) for x in rng.integers(0, 2, k)], "label": [int(x) for x in rng.integers(0, 10, k)]}  # fmt: skip
            writer.write_table(pa.Table.from_pydict(rows, schema=schema))
    return path


# ------------------------------------------------------------------------------------------ child stages


def tiny_model(folder: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from prefalign.worlds.reviews import build_tokenizer

    path = folder / "tiny-lm"
    if not (path / "config.json").exists():
        tokenizer = build_tokenizer()
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_head=2, n_embd=64, n_positions=128,
                            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        GPT2LMHeadModel(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def data_config(source: Path):
    from prefalign.core.data import DataConfig

    return DataConfig(train=str(source), eval_fraction=0.001, max_length=64, max_prompt_length=16)


def stage_load(source: Path, folder: Path) -> dict:
    import datasets  # noqa: F401  (imported before the clock starts: import time is not data work)

    from prefalign.core.data import load_records

    start, cpu = time.perf_counter(), time.process_time()
    train, held_out = load_records(data_config(source), seed=0)
    return {
        "seconds": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu,
        "records": len(train) + len(held_out),
    }


def stage_tokenize(source: Path, folder: Path) -> dict:
    from transformers import AutoTokenizer

    from prefalign.core.data import load_records
    from prefalign.core.encode_arrow import encode_data

    tokenizer = AutoTokenizer.from_pretrained(tiny_model(folder))
    train, _ = load_records(data_config(source), seed=0)
    start, cpu = time.perf_counter(), time.process_time()
    encoded = encode_data(tokenizer, train, data_config(source), "data.train", (64, 16))
    return {
        "seconds": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu,
        "records": len(encoded),
    }


def stage_first_step(source: Path, folder: Path) -> dict:
    from prefalign import runner

    cfg = runner.build_config({
        "method": "dpo",
        "model": {"name_or_path": str(tiny_model(folder)), "reference": {"strategy": "frozen"}},
        "data": {"train": str(source), "eval_fraction": 0.0, "max_length": 64, "max_prompt_length": 16},
        "train": {"output_dir": str(folder / f"run-{os.getpid()}"), "max_steps": 1, "batch_size": 8,
                  "progress": False, "resume": False},
    })  # fmt: skip
    runner.run(cfg)
    return {"seconds": time.perf_counter() - STARTED, "cpu_s": time.process_time()}


def stage_loader(source: Path, folder: Path, workers: int, steps: int = 60) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefalign.core.data import load_records
    from prefalign.core.encode_arrow import encode_data
    from prefalign.core.logprobs import collate
    from prefalign.methods.dpo import LossConfig, PreferenceLoss, make_step

    torch.manual_seed(0)
    path = tiny_model(folder)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    train, _ = load_records(data_config(source), seed=0)
    encoded = encode_data(tokenizer, train, data_config(source), "data.train", (64, 16))
    step = make_step(PreferenceLoss(LossConfig(name="simpo")))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pad = tokenizer.pad_token_id
    sampler = torch.utils.data.RandomSampler(encoded, generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(
        encoded,
        batch_size=8,
        sampler=sampler,
        num_workers=workers,
        collate_fn=lambda items: collate(items, pad, packed=True),
    )
    times, it = [], iter(loader)
    for k in range(steps + 5):
        start = time.perf_counter()
        loss, _ = step(model, next(it))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if k >= 5:
            times.append(time.perf_counter() - start)
    return {"steps_per_s": len(times) / sum(times)}


def stage_images(source: Path, folder: Path) -> dict:
    import torch

    from prefalign.core import conditioning
    from prefalign.core.images import ImageDataConfig, load_image_data

    class StandIn:  # a VAE stand-in: 2x2 average pooling (the cache's cost is the decode, the write and the key)
        device = torch.device("cpu")

        def __init__(self):
            self.parts = type("Parts", (), {"vae": torch.nn.Linear(1, 1)})()
            self.parts.vae.config = type("Config", (), {"scaling_factor": 1.0})()

        def model_images(self, x):
            return torch.nn.functional.avg_pool2d(x, 2)

        def time_ids(self, batch, n):
            return torch.zeros(n, 6)

    start, cpu = time.perf_counter(), time.process_time()
    data = load_image_data(source, True, None, ImageDataConfig(train=str(source), resolution=16))
    loaded = time.perf_counter() - start
    cached = conditioning.cache_latents(data, StandIn(), folder / "latents", batch_size=64)
    seconds = time.perf_counter() - start
    total = sum(float(cached[i]["chosen"].sum()) for i in range(0, len(cached), max(1, len(cached) // 1000)))
    return {
        "seconds": seconds,
        "cpu_s": time.process_time() - cpu,
        "load_seconds": loaded,
        "records": len(cached),
        "check": total,
    }


STAGES = {
    "load": stage_load,
    "tokenize": stage_tokenize,
    "first_step": stage_first_step,
    "images": stage_images,
}
STARTED = time.perf_counter()


def child(stage: str, source: str, folder: str, workers: int) -> None:
    os.environ["PREFALIGN_DATA_CACHE"] = str(Path(folder) / "cache")
    if stage == "loader":
        out = stage_loader(Path(source), Path(folder), workers)
    else:
        out = STAGES[stage](Path(source), Path(folder))
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["load_average"] = open("/proc/loadavg").read().split()[:3]
    with open(Path(folder).parent.parent / "results.jsonl", "a") as log:  # every stage, as it ends
        log.write(json.dumps({"stage": stage, "source": source, "cache": folder, "workers": workers, **out}) + "\n")
    print("RESULT " + json.dumps(out), flush=True)


def run_child(stage: str, source: Path, folder: Path, workers: int = 0) -> dict:
    command = [sys.executable, __file__, "--child", stage, str(source), str(folder), str(workers)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.split("RESULT ")[-1])
    result["wall_s"] = time.perf_counter() - start
    return result


def measure(rows: int, images: int, root: Path, loader: bool) -> dict:
    """Every stage in a fresh process; "cold" against an empty data cache, "cached" against the one the cold
    stages filled."""
    folder = root / f"rows-{rows}"
    folder.mkdir(parents=True, exist_ok=True)
    files = make_preferences(root, rows)
    out: dict = {"rows": rows, "load_average": open("/proc/loadavg").read().split()[:3]}
    if rows <= COLD_FIRST_STEP_ROWS:  # above: cold load + cold tokenize + the cached first step say it
        out["jsonl/cold/first_step"] = run_child("first_step", files["jsonl"], folder / "first-step")
    for kind, stages in (("jsonl", ("load", "tokenize", "first_step")), ("parquet", ("load",))):
        for phase in ("cold", "cached"):
            for stage in stages:
                if (kind, phase, stage) != ("jsonl", "cold", "first_step"):
                    out[f"{kind}/{phase}/{stage}"] = run_child(stage, files[kind], folder / kind)
    if loader:
        for workers in (0, 2):
            out[f"loader/{workers}"] = run_child("loader", files["jsonl"], folder / "jsonl", workers)
    if images:
        table = make_images(root, images)
        for phase in ("cold", "cached"):
            out[f"images/{phase}"] = run_child("images", table, folder / "images")
    out["load_average_end"] = open("/proc/loadavg").read().split()[:3]
    return out


def table(results: list[dict]) -> str:
    lines = ["| rows | measure | wall s | CPU s | rows/s (CPU) | peak RSS MiB |", "|---|---|---|---|---|---|"]
    for r in results:
        for key, value in r.items():
            if not isinstance(value, dict):
                continue
            seconds, cpu = value.get("seconds", value.get("wall_s")), value.get("cpu_s")
            rate = value["records"] / cpu if value.get("records") and cpu else None
            extra = f" {value['steps_per_s']:.1f} steps/s" if "steps_per_s" in value else ""
            lines.append(
                f"| {r['rows']} | {key}{extra} | {seconds:.2f} | {'' if cpu is None else f'{cpu:.2f}'} | "
                f"{'' if rate is None else f'{rate:,.0f}'} | {value['peak_rss_mib']:.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000])
    parser.add_argument("--images", type=int, default=100_000, help="image-pair rows (0: none)")
    parser.add_argument("--no-loader", action="store_true", help="skip the 0 vs 2 workers measurement")
    parser.add_argument(
        "--root", type=Path, default=None, help="where data and caches go (default: a temp dir)"
    )
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.child[2], int(args.child[3]))
        return
    root = args.root or Path(tempfile.mkdtemp(prefix="data-scale-"))
    results = []
    for i, rows in enumerate(args.rows):
        results.append(measure(rows, args.images if i == 0 else 0, root, not args.no_loader and i == 0))
        (HERE / f"data_scale-{rows}.json").write_text(json.dumps(results[-1], indent=1))
        print(table(results[-1:]), flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
