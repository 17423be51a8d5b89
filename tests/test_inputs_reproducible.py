"""Reproducibility (issue 11, fault 15): the same config gives the same numbers, whatever the process drew
before and whatever its hash seed. (a) LoRA adapters start from the run seed; (b) the reviews world trains
the same reference model every time (its SFT uses GPT-2 dropout, which drew from the global RNG)."""

import hashlib
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from inputs_tiny import byte_bpe, dpo_config, gpt2, save, write_jsonl
from prefalign import runner
from prefalign.core.models import LoraSettings, add_lora
from prefalign.worlds import reviews

torch.set_num_threads(1)
TINY_SFT = reviews.ReferenceConfig(sft_steps=12, warmup_steps=3, batch_size=8)


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def lora_a_digest(seed: int) -> str:
    model = add_lora(gpt2(byte_bpe()), LoraSettings(enabled=True, r=4), seed=seed)
    return digest(p for n, p in sorted(model.named_parameters()) if "lora_A" in n)


def reference_digest() -> str:
    model, _ = reviews.train_reference(TINY_SFT, seed=0, progress=False)
    return digest(p for _, p in sorted(model.state_dict().items()))


def test_two_identical_lora_runs_give_identical_losses_and_weights(tmp_path):
    tok = byte_bpe()
    save(gpt2(tok), tok, tmp_path / "model")
    rows = [{"prompt": f"Q{i}: is water wet?", "chosen": " yes it is.", "rejected": " no."} for i in range(8)]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    runs = []
    for k in range(2):
        torch.manual_seed(1000 + k)  # another global RNG state before each run
        torch.rand(17)
        cfg = dpo_config(tmp_path / "model", data, tmp_path / f"run{k}", **{
            "model.lora": {"enabled": True, "r": 4}, "train.max_steps": 3, "train.learning_rate": 1e-2,
        })  # fmt: skip
        result = runner.run(runner.build_config(cfg))
        runs.append(
            (
                [h["loss"] for h in result.history if "loss" in h],
                load_file(result.run_dir / "final" / "adapter_model.safetensors"),
            )
        )
    (losses0, weights0), (losses1, weights1) = runs
    assert losses0 == losses1 and len(losses0) == 3
    assert weights0.keys() == weights1.keys()
    assert all(torch.equal(weights0[k], weights1[k]) for k in weights0)
    assert any(float(w.abs().sum()) > 0 for k, w in weights0.items() if "lora_B" in k)  # trained


def test_reviews_reference_is_bit_identical_between_trainings():
    torch.manual_seed(1)
    first = reference_digest()
    torch.manual_seed(2)
    torch.rand(100)
    assert reference_digest() == first
    # the cache key names this version of the SFT (a changed training must not read an old cache entry)
    assert reviews.reference_key(TINY_SFT, 0) != reviews.reference_key(TINY_SFT, 1)


def test_same_values_in_a_fresh_process_with_another_hash_seed():
    """peft drew LoRA A matrices in the order of a set of module names (varies with PYTHONHASHSEED)."""
    here = os.path.dirname(__file__)
    code = (
        f"import sys; sys.path.insert(0, {here!r}); import torch; torch.set_num_threads(1); "
        "import test_inputs_reproducible as t; lora = t.lora_a_digest(0); torch.manual_seed(99); "
        "print(lora, t.reference_digest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    lora, reference = out.stdout.split()[-2:]
    assert lora == lora_a_digest(0) != lora_a_digest(1)
    torch.manual_seed(7)
    assert reference == reference_digest()
