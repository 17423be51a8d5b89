"""What a user sees on day one: `--version`, `train --help`, `prefalign config METHOD` (every key with its
type, default and meaning), `prefalign init METHOD` (a commented config that builds), the console of a
short run, and trackers that fail fast with the pip command."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from prefalign import __version__, runner
from prefalign.cli import app
from prefalign.core import console
from prefalign.core.config import build
from prefalign.core.config_doc import describe, field_comments, yaml_value
from prefalign.core.data import DataConfig, PreferenceRecord
from prefalign.core.encode import encode_data
from prefalign.core.models import ModelConfig, load_policy
from prefalign.worlds.reviews import build_tokenizer


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"prefalign {__version__}"


def test_train_help_says_where_every_key_is_described():
    result = invoke("train", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for needle in ("--set", "prefalign config METHOD", "prefalign init METHOD", "log_every"):
        assert needle in text, needle
    assert all(method in text for method in runner.METHODS)


def test_help_starts_without_torch():
    """`prefalign --help` and `train --help` import neither torch nor transformers (they cost seconds); the
    command's method names are the runner's."""
    import prefalign.cli

    assert prefalign.cli.METHODS == tuple(runner.METHODS)
    code = (
        "import sys; from typer.testing import CliRunner; from prefalign.cli import app; "
        "r = CliRunner().invoke(app, ['train', '--help']); assert r.exit_code == 0, r.output; "
        "heavy = [m for m in ('torch', 'transformers', 'accelerate', 'peft', 'diffusers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@dataclasses.dataclass
class _Example:
    """A docstring that is not a field."""

    plain: int = 1  # trailing comment
    # the comment lines right above a field
    # are its meaning too
    above: str = "x"
    # a part above
    both: float = 0.5  # and a trailing part

    untold: bool = False
    multi: list[int] = dataclasses.field(default_factory=list)  # a field spread over lines

    def validate(self):  # a method, not a field
        pass


def test_field_comments_are_read_from_the_source():
    """Hand-written expectations: trailing comment; comment lines right above (joined); above + trailing;
    a blank line ends a block of comments (`untold` has none); a field written over several lines."""
    assert field_comments(_Example) == {
        "plain": "trailing comment",
        "above": "the comment lines right above a field are its meaning too",
        "both": "a part above and a trailing part",
        "multi": "a field spread over lines",
    }


@pytest.mark.parametrize("method", list(runner.METHODS))
def test_config_lists_every_key_with_type_default_and_meaning(method):
    """Every dotted key of the method's Config is one line: key, type, default as YAML, a meaning (no key
    without one); old key names (RENAMES) are not listed."""
    module = runner.method_module(method)
    result = invoke("config", method)
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line and not line[0].isspace()}
    docs = describe(module.Config, skip=set(getattr(module, "RENAMES", {})))
    assert docs and all(d.meaning for d in docs), [d.key for d in docs if not d.meaning]
    for d in docs:
        line = lines[d.key]
        assert d.type in line and yaml_value(d.default) in line and d.meaning in line, line
    assert not any(k in lines for k in getattr(module, "RENAMES", {}))


def test_config_line_of_a_known_key():
    result = invoke("config", "dpo")
    line = next(x for x in result.output.splitlines() if x.startswith("train.learning_rate "))
    assert line.split()[:3] == ["train.learning_rate", "float", "5.0e-05"] and "AdamW" in line
    assert "dpo: beta 0.1, label_smoothing 0.0" in result.output  # from dpo_loss's signature
    assert invoke("config", "em-dpo").exit_code == 0  # the demo spelling is accepted
    bad = invoke("config", "ppo")
    assert bad.exit_code == 2 and "unknown method 'ppo'" in bad.output


@pytest.mark.parametrize(
    "value",
    [
        5e-05,
        1e-5,
        0.1,
        3.0,
        1e20,
        float("inf"),
        7,
        True,
        None,
        "world:reviews",
        "yes",
        "1e-5",
        "",
        [1, 2],
        {},
    ],
)
def test_yaml_values_read_back_as_themselves(value):
    """PyYAML reads `5e-05` as a string (YAML 1.1 floats need a dot): the starter config must not."""
    assert yaml.safe_load(f"k: {yaml_value(value)}")["k"] == value


@pytest.mark.parametrize("method", list(runner.METHODS))
def test_init_writes_a_commented_config_that_builds(method, tmp_path, capsys):
    """`prefalign init METHOD > my.yaml` builds into the method's Config equal to its defaults except the
    REQUIRED placeholders, with no deprecation message, and carries a comment on every key line."""
    result = invoke("init", method)
    assert result.exit_code == 0
    path = tmp_path / "my.yaml"
    path.write_text(result.output)
    cfg = runner.load_config(path)
    assert "deprecated" not in capsys.readouterr().err
    defaults = runner.method_module(method).Config()
    for key in ("model.name_or_path", "data.train"):
        head, leaf = key.split(".")
        if hasattr(getattr(defaults, head), leaf) and not getattr(getattr(defaults, head), leaf):
            setattr(getattr(defaults, head), leaf, getattr(getattr(cfg, head), leaf))
    assert cfg == defaults
    keys = [line for line in result.output.splitlines() if re.match(r"^\s*\w+: \S", line)]
    assert keys and all("  # " in line for line in keys), [k for k in keys if "  # " not in k]
    assert "REQUIRED" in result.output


def test_truncation_row_counts_cut_prompts_and_responses():
    """Word-level tokenizer: one token per word, no BOS. Lengths (8, 3). Record 0: prompt of 2 words (kept),
    responses of 3 and 6 words (+EOS: 4 and 7 tokens; budget 8 - 2 = 6) -> the second is cut. Record 1:
    prompt of 5 words (cut to 3), responses of 2 and 3 tokens (budget 5: kept). Record 2: prompt of exactly 3
    words (not cut). Record 3: two 7-word responses equal in their first 6 words -> both cut, identical after
    truncation, dropped (on_bad_row: skip). So 1 of 4 prompts, 3 of 8 responses, 1 record dropped."""
    tokenizer = build_tokenizer()
    records = [
        PreferenceRecord.pair("the pizza", "the food was", "the food was great and tasty"),
        PreferenceRecord.pair("the pizza was really great", "great", "very tasty"),
        PreferenceRecord.pair("the pizza was", "tasty", "bland"),
        PreferenceRecord.pair(
            "the pizza", "the food was great and very tasty", "the food was great and very bland"
        ),
    ]
    encoded = encode_data(tokenizer, records, DataConfig(on_bad_row="skip"), "t", (8, 3))
    assert console.truncation_row(encoded) == (
        "1 of 4 prompts cut to their last 3 tokens, 3 of 8 responses cut to fit max_length 8; "
        "1 records dropped (responses with identical token ids)"
    )


def short_run(tmp_path, tiny_lm, pairs_file, **train):
    data = pairs_file(tmp_path / "d.jsonl", 40)
    cfg = {
        "method": "dpo",
        "model": {"name_or_path": str(tiny_lm), "lora": {"enabled": True, "r": 2, "alpha": 4}},
        "data": {"train": str(data), "max_length": 24, "max_prompt_length": 8},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 6, "batch_size": 4, "log_every": 2,
                  "learning_rate": 1e-3, **train},
    }  # fmt: skip
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_console_of_a_short_run(tmp_path, tiny_lm, pairs_file):
    """The block before training (its numbers derived here independently), one metrics line per log_every,
    the eval line, the closing summary; no progress-bar redraws off a terminal; no peft Conv1D warning."""
    result = invoke("train", short_run(tmp_path, tiny_lm, pairs_file))
    assert result.exit_code == 0, result.output
    out = result.output
    rows = dict(re.findall(r"^  (\w+) +(.*)$", out.split("\nstep ")[0], flags=re.M))  # the start block
    for name in ("model", "loss", "data", "split", "truncated", "reference", "packing", "device", "steps"):
        assert name in rows, (name, out)
    lora = build(ModelConfig, {"name_or_path": str(tiny_lm), "lora": {"enabled": True, "r": 2, "alpha": 4}})
    model, _ = load_policy(lora)  # the run's policy, counted here
    n_all = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"{console.count(n_all)} parameters, {n_trainable} trainable (LoRA r 2, alpha 4)" in rows["model"]
    assert rows["data"].endswith("40 of 40 rows loaded, none skipped")
    assert rows["split"].startswith("36 train / 4 eval (0.1 of data.train held out")  # 10% of 40
    assert rows["steps"].startswith("6 optimizer steps x 4 records") and "0.667 epochs of 36" in rows["steps"]
    assert rows["loss"] == "dpo (beta 0.1, label_smoothing 0)"
    assert rows["device"].startswith("cpu (1 process)") and rows["packing"].startswith("on")
    assert "attention path '" in rows["packing"] and out.startswith("prefalign: dpo ->")  # nothing above it
    steps = re.findall(r"^step (\d)/6 +loss \S+ +acc \S+ +margin \S+ +grad \S+ +lr \S+", out, flags=re.M)
    assert steps == ["2", "4", "6"]
    assert re.search(r"^eval at step 6: +loss \S+ +acc", out, flags=re.M)
    assert "done: 6 steps" in out and str(tmp_path / "run" / "final") in out
    assert "\r" not in out and "fan_in_fan_out" not in out


def test_progress_false_is_quiet(tmp_path, tiny_lm, pairs_file):
    result = invoke("train", short_run(tmp_path, tiny_lm, pairs_file, progress=False))
    assert result.exit_code == 0
    assert result.output.strip() == f"run directory: {tmp_path / 'run'}"


def test_a_missing_tracker_fails_fast_with_the_pip_command(tmp_path, tiny_lm, pairs_file, monkeypatch):
    """report_to names a tracker whose package is absent: one error line with the pip command, before any
    work (no run directory); an unknown tracker name lists accelerate's."""
    import prefalign.core.train as train

    monkeypatch.setattr(train, "get_available_trackers", lambda: [])
    result = invoke(
        "train", short_run(tmp_path, tiny_lm, pairs_file), "--set", "train.report_to=[tensorboard]"
    )
    assert result.exit_code == 2
    assert result.output.count("error:") == 1 and "pip install 'prefalign[tensorboard]'" in result.output
    assert not (tmp_path / "run").exists()
    unknown = invoke(
        "train", short_run(tmp_path, tiny_lm, pairs_file), "--set", "train.report_to=[tensorbored]"
    )
    assert unknown.exit_code == 2 and "unknown tracker 'tensorbored'" in unknown.output
    assert "wandb" in unknown.output


def test_shipped_tracker_config_names_the_extra():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert re.search(r'^tensorboard = \["tensorboard', text, flags=re.M)


@pytest.mark.parametrize(
    "given, hint",
    [
        ({"per_device_train_batch_size": 4}, "train.batch_size"),
        ({"train": {"per_device_train_batch_size": 4}}, "train.batch_size"),
        ({"gradient_accumulation_steps": 2}, "train.grad_accum"),
        ({"num_train_epochs": 1}, "train.epochs"),
        ({"bf16": True}, "train.mixed_precision"),
        ({"lora_r": 8}, "model.lora.r"),
    ],
)
def test_trl_and_llama_factory_keys_get_our_name(given, hint):
    from prefalign.core.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"did you mean '{re.escape(hint)}'"):
        runner.build_config({"method": "dpo", **given})


def test_loading_the_worlds_prints_nothing():
    """Resolving `world:` sources imports every registered world (diffusers' SD pipelines among them); the
    third-party import-time notes (torchvision fallback of CLIP/SigLIP image processors) are silenced, so
    `prefalign config`/`train` start with prefalign's own lines. A fresh interpreter: import-time only."""
    import subprocess
    import sys

    code = "from prefalign.core import sources; assert 'world:reviews' in sources.known()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "torchvision" not in result.stderr and "falling back" not in result.stderr, result.stderr
