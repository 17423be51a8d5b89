"""Two CPU processes (gloo) train like one process with twice the gradient accumulation: micro-batch k goes
to process k % 2, DDP averages the two gradients, so the loss curve matches one process that accumulates
both micro-batches.

Launched with `torchrun --nproc_per_node 2 -m prefalign train ...` and ACCELERATE_USE_CPU=true: on one
machine, accelerate 1.x's `accelerate launch --cpu --num_processes 2` starts ONE process (its multi-CPU path
expects mpirun and a hostfile), so torchrun is the launcher that really starts two ranks; accelerate inside
`prefalign train` then joins them into a gloo process group (see docs/distributed.md)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel

from prefalign.worlds.reviews import build_tokenizer

QUICK = bool(os.environ.get("PREFALIGN_QUICK"))
POSITIVE = ["delicious", "amazing", "tasty", "fresh"]
NEGATIVE = ["awful", "bland", "soggy", "stale"]
NOUNS = ["pizza", "coffee", "bread", "cake", "burger"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two() -> list[str]:
    """The command that starts 2 ranks on this machine (see the module docstring for why not accelerate)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
    ]


def setup_run(tmp_path, steps: int):
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_layer=2,
        n_head=2,
        n_embd=32,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,  # no dropout: deterministic
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    with open(tmp_path / "prefs.jsonl", "w") as fh:
        for i in range(48):
            noun = NOUNS[i % len(NOUNS)]
            row = {
                "prompt": f"review: the {noun} place",
                "chosen": f"the {noun} was {POSITIVE[i % 4]} .",
                "rejected": f"the {noun} was {NEGATIVE[(i // 4) % 4]} .",
            }
            fh.write(json.dumps(row) + "\n")
    cfg = {
        "method": "dpo",
        "model": {"name_or_path": str(tmp_path / "model")},
        "data": {
            "train": str(tmp_path / "prefs.jsonl"),
            "eval_fraction": 0.0,
            "max_length": 24,
            "max_prompt_length": 8,
        },
        "loss": {"name": "dpo", "beta": 0.5},
        "train": {
            "max_steps": steps,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "log_every": 1,
            "progress": False,
            "lr_scheduler": "constant",
        },
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(run_dir):
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one_process_with_double_accumulation(tmp_path):
    steps = 3 if QUICK else 8
    cfg = setup_run(tmp_path, steps)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    one = tmp_path / "one"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "prefalign",
            "train",
            str(cfg),
            "--set",
            f"train.output_dir={one}",
            "--set",
            "train.grad_accum=2",
        ],
        check=True,
        env=env,
        timeout=300,
    )
    two = tmp_path / "two"
    launch = torchrun_two()
    done = subprocess.run(
        [
            *launch,
            "-m",
            "prefalign",
            "train",
            str(cfg),
            "--set",
            f"train.output_dir={two}",
            "--set",
            "train.grad_accum=1",
        ],
        env={**env, "ACCELERATE_USE_CPU": "true"},
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(losses(one)) == steps
    epochs = [json.loads(x)["epoch"] for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert epochs[0] == pytest.approx(2 / 12, abs=1e-3)  # 2 micro-batches of 12 per step: both ranks joined
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)
    assert losses(one)[-1] < losses(one)[0] - 0.01  # the curve moves, so matching it is not trivial
    # both processes precomputed half of the reference log-probs; the one cache file holds all of them
    assert len(list((two / "reference_cache").glob("*.safetensors"))) == 1
    assert (two / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_process_with_double_accumulation(tmp_path):
    """torch's FSDP2 (`fully_shard`, parameters sharded as DTensors) on 2 gloo CPU processes, DPO on packed
    batches: the loss curve equals one process accumulating both micro-batches. (accelerate 1.15 ignores its
    FSDP plugin on CPU processes and wraps DDP instead, so the worker shards with torch directly; see
    docs/distributed.md.)"""
    steps = 3 if QUICK else 6
    worker = str(Path(__file__).with_name("fsdp2_worker.py"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, worker, str(tmp_path / "one.json"), str(steps)], check=True, env=env, timeout=300
    )
    launch = torchrun_two()
    done = subprocess.run(
        [*launch, worker, str(tmp_path / "two.json"), str(steps)],
        env=env,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["world"] == 2 and len(one["losses"]) == steps
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)
    assert max(one["losses"]) - min(one["losses"]) > 0.01  # the curve moves, so matching it is not trivial
