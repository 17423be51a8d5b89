"""User errors that were tracebacks (issue 11, fault 17): each is one `error:` line and exit code 2 from the
CLI, naming the key, file or step, and leaves no run directory behind when nothing was trained."""

import pytest
import torch
from typer.testing import CliRunner

from inputs_tiny import byte_bpe, dpo_config, gpt2, one_error_line, save, write_config, write_jsonl
from prefalign.cli import app

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    tok = byte_bpe()
    save(gpt2(tok), tok, root / "model")
    bad = gpt2(tok)
    with torch.no_grad():
        bad.lm_head.weight[3, 0] = float("nan")  # every log-prob NaN: a non-finite loss at step 1
    save(bad, tok, root / "nan-model")
    rows = [{"prompt": f"Q{i}: is water wet?", "chosen": " yes it is.", "rejected": " no."} for i in range(4)]
    return root, write_jsonl(root / "pairs.jsonl", rows)


def test_non_finite_loss_is_one_line(tmp_path, model_and_data):
    root, data = model_and_data
    cfg = dpo_config(root / "nan-model", data, tmp_path / "run", **{"data.packing": False})
    result = CliRunner().invoke(app, ["train", str(write_config(tmp_path / "c.yaml", cfg))])
    one_error_line(result, "non-finite loss at step 1")


def test_enabling_lora_on_a_full_fine_tuning_run_dir_is_refused_by_key(tmp_path, model_and_data):
    root, data = model_and_data
    path = write_config(tmp_path / "c.yaml", dpo_config(root / "model", data, tmp_path / "run"))
    assert CliRunner().invoke(app, ["train", str(path)]).exit_code == 0
    result = CliRunner().invoke(app, ["train", str(path), "--set", "model.lora.enabled=true"])
    one_error_line(result, "model.lora.enabled", "train.resume: false")


def test_a_data_folder_that_is_not_a_saved_dataset_is_one_line(tmp_path, model_and_data):
    root, _ = model_and_data
    folder = tmp_path / "data-folder"
    folder.mkdir()
    (folder / "pairs.jsonl").write_text("{}\n")
    cfg = dpo_config(root / "model", folder, tmp_path / "run")
    result = CliRunner().invoke(app, ["train", str(write_config(tmp_path / "c.yaml", cfg))])
    one_error_line(result, str(folder), "save_to_disk")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "method, data",
    [
        ("dpo", {"train": "MISSING"}),
        ("dpo", {"train": "PAIRS", "eval": "MISSING"}),
        ("dpo", {"train": ["PAIRS", "MISSING"]}),
        ("pfm", {"train": "MISSING"}),
        ("sspo", {"train": "MISSING"}),
        ("diffusion_dpo", {"train": "MISSING"}),
    ],
)
def test_a_missing_data_file_names_its_config_key_before_any_work(tmp_path, model_and_data, method, data):
    """Every method: a data path that does not exist is one line naming the key (`data.train`,
    `data.eval`, `data.train[1]`), raised before the model loads and leaving no run directory."""
    root, pairs = model_and_data
    missing = str(tmp_path / "nope.jsonl")

    def fill(value):
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return {"MISSING": missing, "PAIRS": str(pairs)}.get(value, value)

    data = fill(data)
    key = next(f"data.{k}" + (f"[{i}]" if isinstance(v, list) else "")
               for k, v in data.items() for i, s in enumerate(v if isinstance(v, list) else [v])
               if missing in str(s))  # fmt: skip
    cfg = {"method": method, "data": data,
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "progress": False}}  # fmt: skip
    if method != "pfm":  # a flow has no model to load
        cfg["model"] = {"name_or_path": str(root / "no-model-needed")}
    result = CliRunner().invoke(app, ["train", str(write_config(tmp_path / "c.yaml", cfg))])
    one_error_line(result, f"config key '{key}'", "file not found", missing)
    assert not (tmp_path / "run").exists()
