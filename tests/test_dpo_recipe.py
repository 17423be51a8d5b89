"""`prefalign train` end to end on user data files, and the CLI's one-line errors for bad configs."""

import json

import pytest
import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from prefalign.cli import app
from prefalign.worlds.reviews import build_tokenizer

POSITIVE = ["delicious", "amazing", "tasty", "fresh", "wonderful", "excellent", "lovely", "perfect"]
NEGATIVE = ["awful", "bland", "soggy", "stale", "terrible", "disgusting", "dirty", "inedible"]
NOUNS = ["pizza", "coffee", "bread", "cake", "burger", "curry", "dumplings", "noodles", "fries", "cheese"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer GPT-2 with the reviews world's word-level tokenizer, saved like a hub checkpoint."""
    path = tmp_path_factory.mktemp("model")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_layer=2,
            n_head=2,
            n_embd=32,
            n_positions=32,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_pairs(path, n=160, seed=0):
    """Pairs whose chosen response has a positive adjective and rejected a negative one."""
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as fh:
        for i in range(n):
            noun = NOUNS[i % len(NOUNS)]
            pos = POSITIVE[int(torch.randint(len(POSITIVE), (1,), generator=g))]
            neg = NEGATIVE[int(torch.randint(len(NEGATIVE), (1,), generator=g))]
            fh.write(
                json.dumps(
                    {
                        "prompt": f"review: the {noun} place",
                        "chosen": f"the {noun} was {pos} .",
                        "rejected": f"the {noun} was {neg} .",
                    }
                )
                + "\n"
            )


def write_config(tmp_path, model_dir, data, **train):
    cfg = {
        "method": "dpo",
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(data), "eval_fraction": 0.2, "max_length": 32, "max_prompt_length": 8},
        "loss": {"name": "dpo", "beta": 0.5},
        "train": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 40,
            "batch_size": 16,
            "learning_rate": 3e-3,
            "log_every": 5,
            "eval_every": 20,
            "progress": False,
            **train,
        },
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_on_user_jsonl_learns_the_preference(tmp_path, tiny_model_dir):
    data = tmp_path / "prefs.jsonl"
    write_pairs(data)
    result = CliRunner().invoke(app, ["train", str(write_config(tmp_path, tiny_model_dir, data))])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "rewards/margins" in x]
    evals = [x for x in lines if "eval/rewards/accuracies" in x]
    # held-out pairs (different adjective/noun combinations) are ranked correctly after training
    assert evals[-1]["eval/rewards/accuracies"] >= 0.9
    assert evals[-1]["eval/loss"] < 0.5 < 0.693  # ln 2 at the start
    assert train_lines[-1]["rewards/margins"] > train_lines[0]["rewards/margins"]
    assert (run / "final" / "model.safetensors").is_file()
    assert (run / "config.yaml").is_file()
    # the reference log-probs were precomputed and cached on disk
    assert list((run / "reference_cache").glob("*.safetensors"))
    # `prefalign eval RUN_DIR` reloads final/ and reproduces the held-out accuracy of the last evaluation
    evaluated = CliRunner().invoke(app, ["eval", str(run), "--json"])  # without --json: a summary
    assert evaluated.exit_code == 0, evaluated.output
    numbers = json.loads(evaluated.output[evaluated.output.index("{") :])
    assert numbers["eval/rewards/accuracies"] == pytest.approx(evals[-1]["eval/rewards/accuracies"], abs=1e-6)
    assert numbers["eval/loss"] == pytest.approx(evals[-1]["eval/loss"], abs=1e-4)


def test_lora_with_adapter_reference(tmp_path, tiny_model_dir):
    data = tmp_path / "prefs.jsonl"
    write_pairs(data, n=64)
    cfg = write_config(tmp_path, tiny_model_dir, data, max_steps=10)
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(cfg),
            "--set",
            "model.lora.enabled=true",
            "--set",
            "model.reference.strategy=adapter",
            "--set",
            "train.learning_rate=1e-2",
        ],
    )
    assert result.exit_code == 0, result.output
    final = tmp_path / "run" / "final"
    assert (final / "adapter_model.safetensors").is_file()  # only the adapters are saved
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x for x in lines if "rewards/margins" in x][-1]["rewards/margins"] > 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "train.learning_rat=0.1",
            "unknown config key 'train.learning_rat' (did you mean 'train.learning_rate'?)",
        ),
        ("train.max_steps=ten", "config key 'train.max_steps': expected an integer, got 'ten'"),
        ("loss.name=dpoo", "config key 'loss.name': unknown loss 'dpoo'"),
        ("model.name_or_path=./no/such/model", "model path not found: ./no/such/model"),
    ],
)
def test_bad_config_fails_before_work_with_one_line(tmp_path, tiny_model_dir, override, message):
    data = tmp_path / "prefs.jsonl"
    write_pairs(data, n=20)
    result = CliRunner().invoke(
        app, ["train", str(write_config(tmp_path, tiny_model_dir, data)), "--set", override]
    )
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # a run that never started leaves no run directory behind


def test_empty_dataset_fails_with_one_line(tmp_path, tiny_model_dir):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    result = CliRunner().invoke(app, ["train", str(write_config(tmp_path, tiny_model_dir, data))])
    assert result.exit_code == 2
    assert "empty.jsonl" in result.output and "Traceback" not in result.output
