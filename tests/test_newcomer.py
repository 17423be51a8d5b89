"""What a newcomer tripped on (issue 24): each mistake is one `error:` line naming the key (no traceback), each
legitimate-but-surprising setting gets one line, and TRL's SFT rows and a DatasetDict's own splits work."""

import errno
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from inputs_tiny import byte_bpe, dpo_config, gpt2, one_error_line, save, write_config, write_jsonl
from prefalign import runner
from prefalign.cli import app
from prefalign.core import console
from prefalign.core.report import read_metrics

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("newcomer")
    tok = byte_bpe()
    save(gpt2(tok), tok, root / "model")
    rows = [
        {"prompt": f"Q{i}: is water wet?", "chosen": " yes it is.", "rejected": " no."} for i in range(12)
    ]
    return root, write_jsonl(root / "pairs.jsonl", rows)


def train(tmp_path, cfg, *sets):
    args = ["train", str(write_config(tmp_path / "c.yaml", cfg))]
    for item in sets:
        args += ["--set", item]
    return CliRunner().invoke(app, args)


def test_output_dir_naming_a_file_is_one_line(tmp_path, model_and_data):
    root, data = model_and_data
    (tmp_path / "taken").write_text("a file")
    result = train(tmp_path, dpo_config(root / "model", data, tmp_path / "taken"))
    one_error_line(result, "train.output_dir", "is a file")


def test_output_dir_that_cannot_be_written_is_one_line(tmp_path, model_and_data, monkeypatch):
    """A read-only filesystem (simulated: as root, permission bits do not stop writes) fails before any work."""
    root, data = model_and_data
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if "ro" in self.parts:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    result = train(tmp_path, dpo_config(root / "model", data, tmp_path / "ro" / "run"))
    one_error_line(result, "train.output_dir", "Read-only file system")


@pytest.mark.parametrize(
    "setting, needles",
    [
        ("model.lora.target_modules=[q_projj]", ("model.lora.target_modules", "q_projj", "c_attn")),
        ("model.lora.target_modules=[c_attn, q_projj]", ("q_projj",)),  # one typo beside a real name
        ("train.lr_scheduler=cosin", ("train.lr_scheduler", "did you mean 'cosine'")),
        ("train.lr_scheduler=reduce_lr_on_plateau", ("train.lr_scheduler",)),  # needs a metric: not offered
        ("train.epochs=-1", ("train.epochs", "> 0")),
        ("data.limit=0", ("data.limit", ">= 1")),
        ("train.warmup_steps=5", ("warmup_steps", "constant_with_warmup")),  # with lr_scheduler constant
    ],
)
def test_config_mistakes_are_one_line_before_any_work(tmp_path, model_and_data, setting, needles):
    root, data = model_and_data
    cfg = dpo_config(root / "model", data, tmp_path / "run", **{"train.lr_scheduler": "constant"})
    if "lora" in setting:
        cfg["model"]["lora"] = {"enabled": True}
    one_error_line(train(tmp_path, cfg, setting), *needles)
    assert not (tmp_path / "run").exists()


def test_a_model_folder_without_tokenizer_files_names_model_tokenizer(tmp_path, model_and_data):
    """transformers 5 builds an EMPTY tokenizer for such a folder (every text -> no tokens): refused."""
    root, data = model_and_data
    gpt2(byte_bpe()).save_pretrained(tmp_path / "bare")
    result = train(tmp_path, dpo_config(tmp_path / "bare", data, tmp_path / "run"))
    one_error_line(result, "model.name_or_path", "no tokenizer files", "model.tokenizer")
    cfg = dpo_config(tmp_path / "bare", data, tmp_path / "run", **{"model.tokenizer": str(root / "model")})
    assert train(tmp_path, cfg).exit_code == 0  # the fix the message names works


def test_a_warmup_longer_than_the_run_is_said(tmp_path, model_and_data, caplog):
    """Warmup 50 over 2 steps: step k runs at lr·k/50, so the peak is lr·1/50 — said in one line."""
    root, data = model_and_data
    cfg = dpo_config(
        root / "model", data, tmp_path / "run", **{"train.max_steps": 2, "train.warmup_steps": 50}
    )
    result = train(tmp_path, cfg)
    assert result.exit_code == 0, result.output
    line = [r.getMessage() for r in caplog.records if "warmup_steps 50" in r.getMessage()]
    assert len(line) == 1 and "peaks at 2e-08" in line[0], caplog.text


def test_grad_norm_zero_or_infinite_is_said_once():
    assert console is not None
    from prefalign.core.train import grad_note

    assert grad_note(0.5, 3, 1e-4) is None
    assert "no longer moves" in grad_note(0.0, 3, 1e-4) and "unusually high" not in grad_note(0.0, 3, 1e-4)
    assert "unusually high" in grad_note(math.inf, 2, 1e4)


def test_resuming_with_more_steps_says_the_schedule_is_rebuilt(tmp_path, model_and_data, caplog):
    """4 steps, then resumed to 8: the line says so, and steps 5..8 run the learning rates of a fresh 8-step
    schedule (the loaded scheduler keeps its step count; its function is the new length's)."""
    root, data = model_and_data
    over = {
        "train.max_steps": 4,
        "train.lr_scheduler": "linear",
        "train.learning_rate": 1e-3,
        "train.batch_size": 2,
    }
    cfg = dpo_config(root / "model", data, tmp_path / "run", **over)
    assert train(tmp_path, cfg).exit_code == 0
    result = train(tmp_path, cfg, "train.max_steps=8")
    assert result.exit_code == 0, result.output
    assert sum("train.max_steps 4 -> 8" in r.getMessage() for r in caplog.records) == 1, caplog.text
    fresh = dpo_config(root / "model", data, tmp_path / "fresh", **{**over, "train.max_steps": 8})
    assert train(tmp_path, fresh).exit_code == 0
    resumed = {r["step"]: r["learning_rate"] for r in read_metrics(tmp_path / "run") if "learning_rate" in r}
    once = {r["step"]: r["learning_rate"] for r in read_metrics(tmp_path / "fresh") if "learning_rate" in r}
    assert [resumed[s] for s in range(5, 9)] == pytest.approx([once[s] for s in range(5, 9)])


def test_a_finished_run_is_reused_and_said(tmp_path, model_and_data):
    root, data = model_and_data
    cfg = dpo_config(root / "model", data, tmp_path / "run", **{"train.progress": True})
    assert train(tmp_path, cfg).exit_code == 0
    again = train(tmp_path, cfg)
    assert "already held this finished run" in again.output and "nothing was trained" in again.output


def test_switching_a_recipe_to_sft_drops_its_dpo_options_with_a_line(caplog):
    """`--set loss.name=sft` on the DPO recipe: its loss.beta is left out, said once; an option given with
    --set that sft does not take stays an error."""
    cfg = runner.load_config(Path("configs/dpo_reviews.yaml"), ["loss.name=sft"])
    assert cfg.loss.name == "sft" and cfg.loss.beta is None
    assert sum("loss.beta 0.1 left out" in r.getMessage() for r in caplog.records) == 1, caplog.text
    with pytest.raises(Exception, match="loss 'sft' has no option 'beta'"):
        runner.load_config(Path("configs/dpo_reviews.yaml"), ["loss.name=sft", "loss.beta=0.2"])


SFT_ROWS = [
    {
        "messages": [
            {"role": "user", "content": "Q0: is water wet?"},
            {"role": "assistant", "content": " yes."},
        ]
    },
    {"prompt": "Q1: is water wet?", "completion": " yes it is."},
    {"text": "Q2: is water wet? yes."},
]


def test_sft_trains_on_trl_sft_rows_with_its_own_metrics(tmp_path, model_and_data):
    """messages / prompt+completion / text rows train with loss.name sft; the log has the response's
    likelihood (no preference accuracy or margin, which mean nothing without a rejected response)."""
    root, _ = model_and_data
    template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS * 4)
    cfg = dpo_config(
        root / "model", data, tmp_path / "run", **{"loss.name": "sft", "data.chat_template": template}
    )
    cfg["loss"].pop("beta")
    result = train(tmp_path, cfg)
    assert result.exit_code == 0, result.output
    first = read_metrics(tmp_path / "run")[0]
    assert {"loss", "logps/chosen", "nll_per_token"} <= set(first)
    assert not any(k.startswith("rewards/") for k in first)
    assert first["loss"] == pytest.approx(first["nll_per_token"], rel=1e-6)  # sft's loss: NLL per token


def test_sft_rows_under_a_preference_loss_name_the_row_and_the_fix(tmp_path, model_and_data):
    root, _ = model_and_data
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    result = train(tmp_path, dpo_config(root / "model", data, tmp_path / "run"))
    one_error_line(result, "row 0", "'messages'", "loss.name: sft")


def test_a_dataset_dict_uses_its_test_split_for_evaluation_and_says_so(tmp_path, model_and_data):
    import datasets

    root, _ = model_and_data
    rows = [
        {"prompt": f"Q{i}: is water wet?", "chosen": " yes it is.", "rejected": " no."} for i in range(12)
    ]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:3])}
    ).save_to_disk(str(tmp_path / "dd"))
    cfg = dpo_config(root / "model", tmp_path / "dd", tmp_path / "run", **{"train.progress": True})
    cfg["data"].pop("eval_fraction")  # the default 0.1 would hold out part of train without a test split
    result = train(tmp_path, cfg)
    assert result.exit_code == 0, result.output
    split = [x for x in result.output.splitlines() if x.strip().startswith("split")]
    assert "12 train (split 'train') / 3 eval" in split[0] and "split 'test'" in split[0], split
    assert any(f"{tmp_path / 'dd'}[train]" in x for x in result.output.splitlines())


def test_init_does_not_prefill_a_hub_download():
    result = CliRunner().invoke(app, ["init", "dpo"])
    line = next(x for x in result.output.splitlines() if x.strip().startswith("name_or_path"))
    assert "./my-model" in line and "REQUIRED" in line


def test_run_directory_line_only_on_the_main_process(tmp_path, model_and_data, monkeypatch):
    root, data = model_and_data
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(runner, "run", lambda cfg: type("R", (), {"run_dir": tmp_path})())
    result = train(tmp_path, dpo_config(root / "model", data, tmp_path / "run"))
    assert result.exit_code == 0 and "run directory" not in result.output, result.output


def test_demos_use_one_thread_unless_told(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert console.threads_for_tiny_models() is None
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert "threads: 1" in console.threads_for_tiny_models() and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_start_block_epochs_match_the_metrics_count(tmp_path, model_and_data):
    """12 records, batch 5: 3 micro-batches per epoch (the last one short); 2 steps x accumulation 2 = 4
    micro-batches = 1.333 epochs, as metrics.jsonl (and so the model card) counts them — not 20 / 12."""
    root, data = model_and_data
    over = {"train.batch_size": 5, "train.grad_accum": 2, "train.max_steps": 2, "train.progress": True}
    result = train(tmp_path, dpo_config(root / "model", data, tmp_path / "run", **over))
    assert result.exit_code == 0, result.output
    assert "= 1.33 epochs of 12" in result.output, result.output
    assert read_metrics(tmp_path / "run")[-1]["epoch"] == pytest.approx(4 / 3, abs=1e-4)
