"""The runner: one path for every method. `prefalign train` then `prefalign eval` on a tiny config of each
method the CLI lists; run directories refused under another config; EM-DPO resumes after kill -9."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from prefalign import runner
from prefalign.cli import app
from prefalign.worlds import digits_ddpm

WORDS = ["tasty", "fresh", "bland", "soggy", "great", "awful"]


@pytest.fixture(scope="module")
def lm_dir(tiny_lm):
    return tiny_lm  # tests/conftest.py: a 1-layer GPT-2 with the reviews tokenizer


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("unet")
    torch.manual_seed(0)
    digits_ddpm.build_digits_unet(digits_ddpm.DigitsDDPMConfig(channels=(8, 16))).save_pretrained(
        path / "unet"
    )
    digits_ddpm.build_scheduler(digits_ddpm.DigitsDDPMConfig(num_train_timesteps=100)).save_pretrained(
        path / "scheduler"
    )
    return path


def lm_rows(n, annotators=0, k=2):
    rows = []
    for i in range(n):
        responses = [f"the food was {WORDS[(i + j) % len(WORDS)]} ." for j in range(k)]
        row = {"prompt": "review: the pizza place", "responses": responses, "ranking": list(range(k))}
        if annotators:
            row["annotator"] = f"u{i % annotators}"
        rows.append(row)
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def image_pairs(path, n=12):
    rng = np.random.default_rng(0)
    np.savez(path, chosen=rng.random((n, 1, 8, 8), dtype=np.float32),
             rejected=rng.random((n, 1, 8, 8), dtype=np.float32), context=np.arange(n) % 10)  # fmt: skip
    return path


TRAIN = {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3, "log_every": 1, "progress": True}


def method_config(method, tmp_path, lm_dir, unet_dir):
    out = {"output_dir": str(tmp_path / "run"), **TRAIN}
    lm = {"name_or_path": str(lm_dir)}
    data = {"max_length": 24, "max_prompt_length": 8}
    if method == "dpo":
        return {"method": "dpo", "model": lm, "data": {"train": str(write_jsonl(tmp_path / "d.jsonl", lm_rows(20))),
                "eval_fraction": 0.25, **data}, "train": out}  # fmt: skip
    if method == "mpo":
        return {"method": "mpo", "model": lm, "data": {"train": str(write_jsonl(tmp_path / "d.jsonl", lm_rows(20))),
                "eval_fraction": 0.25, **data}, "mpo": {"samples_per_prompt": 1, "max_new_tokens": 4},
                "train": out}  # fmt: skip
    if method == "em_dpo":
        return {"method": "em_dpo", "model": {**lm, "lora": {"enabled": True, "r": 2, "alpha": 4}},
                "data": {"train": str(write_jsonl(tmp_path / "d.jsonl", lm_rows(16, annotators=4, k=3))), **data},
                "em": {"n_types": 2, "max_iterations": 1, "init": "dirichlet"}, "train": out}  # fmt: skip
    if method == "pfm":
        rng = np.random.default_rng(0)
        chosen = rng.normal(1.0, 0.3, (64, 2)).astype(np.float32)
        np.savez(tmp_path / "v.npz", chosen=chosen, rejected=chosen - 1.0)
        return {"method": "pfm", "model": {"hidden": 16, "depth": 1}, "data": {"train": str(tmp_path / "v.npz"),
                "eval_fraction": 0.25}, "train": {**out, "batch_size": 16, "max_steps": 150, "learning_rate": 1e-2,
                "log_every": 50}}  # fmt: skip
    pairs = str(image_pairs(tmp_path / "p.npz"))
    unet = {"name_or_path": str(unet_dir)}
    if method == "diffusion_dpo":
        return {"method": "diffusion_dpo", "model": unet, "data": {"train": pairs}, "loss": {"beta": 100.0},
                "train": out}  # fmt: skip
    return {"method": "sspo", "model": unet, "data": {"train": pairs}, "loss": {"beta": 100.0},
            "sspo": {"reference_sample": {"steps": 2}}, "train": out}  # fmt: skip


EXPECTED = {  # keys every `prefalign eval` of a method reports on user data
    "dpo": ["eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"],
    "mpo": ["eval/mpo/preference_loss", "eval/rewards/accuracies"],
    "em_dpo": ["em/type_weight/type0", "em/type_weight/type1", "em/log_likelihood"],
    "pfm": ["eval/loss", "eval/distance_to_chosen_before", "eval/distance_to_chosen_after"],
    "diffusion_dpo": ["train_pairs/loss", "train_pairs/rewards/accuracies"],
    "sspo": ["train_pairs/mse/chosen", "train_pairs/mse/chosen_base"],
}


@pytest.mark.parametrize("method", list(runner.METHODS))
def test_train_then_eval_every_method(method, tmp_path, lm_dir, unet_dir):
    assert set(EXPECTED) == set(runner.METHODS)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(method_config(method, tmp_path, lm_dir, unet_dir)))
    trained = CliRunner().invoke(app, ["train", str(path)])
    assert trained.exit_code == 0, trained.output
    assert f"prefalign: {method} -> " in trained.output and "done: " in trained.output  # the console
    run = tmp_path / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"] == method and (run / "final").is_dir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == method
    evaluated = CliRunner().invoke(app, ["eval", str(run)])
    assert evaluated.exit_code == 0, evaluated.output
    numbers = json.loads((run / "eval.json").read_text())
    for key in EXPECTED[method]:
        assert np.isfinite(numbers[key]), (key, numbers)
    if method == "em_dpo":
        assert sum(numbers[f"em/type_weight/type{k}"] for k in range(2)) == pytest.approx(1.0)
    if method == "pfm":  # chosen = rejected + 1: the flow carries rejected samples towards chosen ones
        assert numbers["eval/distance_to_chosen_after"] < numbers["eval/distance_to_chosen_before"]
    if method == "dpo":  # final/ re-evaluated = the run's last evaluation
        last = [
            h for h in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/loss" in h
        ][-1]
        assert numbers["eval/loss"] == pytest.approx(last["eval/loss"], abs=1e-4)


def test_a_run_dir_is_resumed_only_under_its_config(tmp_path, lm_dir, unet_dir):
    """Same output_dir, other data: refused with the differing key named (not 'resumed', 0 steps, old final/).
    More steps under the same config resume; train.resume=false starts over."""
    cfg = method_config("dpo", tmp_path, lm_dir, unet_dir)
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert CliRunner().invoke(app, ["train", str(path)]).exit_code == 0
    other = write_jsonl(tmp_path / "other.jsonl", lm_rows(20)[::-1])
    refused = CliRunner().invoke(app, ["train", str(path), "--set", f"data.train={other}"])
    assert (
        refused.exit_code == 2 and "data.train" in refused.output and "train.resume: false" in refused.output
    )
    assert (
        yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["train"]
        == cfg["data"]["train"]
    )
    longer = CliRunner().invoke(app, ["train", str(path), "--set", "train.max_steps=3"])
    assert longer.exit_code == 0 and "resumed" in longer.output
    fresh = CliRunner().invoke(
        app, ["train", str(path), "--set", f"data.train={other}", "--set", "train.resume=false"]
    )
    assert fresh.exit_code == 0, fresh.output
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 1 and max(steps) == 2


EM_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import prefalign.methods.em_dpo.em as em
    original, calls = em.make_step, [0]

    def make_step(*args, **kwargs):  # counts loss evaluations over all M-steps; SIGKILLs at KILL_AT_CALL
        step = original(*args, **kwargs)

        def wrapped(model, batch):
            calls[0] += 1
            if calls[0] == int(os.environ.get("KILL_AT_CALL", 0)):
                os.kill(os.getpid(), 9)
            return step(model, batch)

        return wrapped

    em.make_step = make_step
    from prefalign.cli import main
    sys.argv = ["prefalign", "train", sys.argv[1]]
    main()
    """
)


def test_em_dpo_resumes_after_kill_9(tmp_path, lm_dir, unet_dir):
    """EM-DPO, 3 iterations, each M-step checkpointing every step. Run B is killed with SIGKILL inside the
    second iteration's M-step (after its step-1 checkpoint), then rerun: its metrics (per iteration) and
    final type policies equal those of the uninterrupted run A."""
    cfgs = {}
    for name in "AB":
        (tmp_path / name).mkdir()
        cfg = method_config("em_dpo", tmp_path / name, lm_dir, unet_dir)
        # tolerance null: all 3 iterations run (this test is about resuming, not about the plateau rule)
        cfg["em"].update({"max_iterations": 3, "m_step": "stochastic", "tolerance": None})
        cfg["train"].update({"save_every": 1, "max_steps": 3, "epochs": None})
        cfgs[name] = tmp_path / name / "cfg.yaml"
        cfgs[name].write_text(yaml.safe_dump(cfg))
    script = tmp_path / "killer.py"
    script.write_text(EM_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    a = subprocess.run([sys.executable, str(script), str(cfgs["A"])], env=env, capture_output=True, text=True)
    assert a.returncode == 0, a.stderr[-2000:]
    # M-steps of 3 steps: calls 1-3 are iteration 1, call 5 is step 2 of iteration 2 (after its step-1 checkpoint)
    killed = subprocess.run([sys.executable, str(script), str(cfgs["B"])], capture_output=True, text=True,
                            env={**env, "KILL_AT_CALL": "5"})  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / "B" / "run" / "m_steps" / "iter-2" / "checkpoints" / "step-1").is_dir()
    assert (tmp_path / "B" / "run" / "em" / "iter-1" / "state.json").is_file()  # iteration 1 finished
    assert not (tmp_path / "B" / "run" / "final").exists()
    resumed = subprocess.run(
        [sys.executable, str(script), str(cfgs["B"])], env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def lines(name):
        return [json.loads(x) for x in (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()]

    la, lb = lines("A"), lines("B")
    assert [x["iteration"] for x in lb] == [1, 2, 3]
    for x, y in zip(la, lb):
        assert x["em/log_likelihood"] == pytest.approx(y["em/log_likelihood"], abs=1e-6)
        assert x["em/type_weights"] == pytest.approx(y["em/type_weights"], abs=1e-7)
    from safetensors.torch import load_file

    for k in range(2):
        wa = load_file(
            tmp_path / "A" / "run" / "final" / "adapters" / f"type{k}" / "adapter_model.safetensors"
        )
        wb = load_file(
            tmp_path / "B" / "run" / "final" / "adapters" / f"type{k}" / "adapter_model.safetensors"
        )
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], atol=1e-6, rtol=0)
