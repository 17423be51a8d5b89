"""Fixtures shared by the CLI tests: a tiny causal LM on disk, preference files for it, and the README's
tour (its first command, `prefalign demo dpo --quick`, run once for the tour test and the demo test)."""

import json
import os
import re
import shlex
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from prefalign.worlds.reviews import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]

WORDS = ["tasty", "fresh", "bland", "soggy", "great", "awful"]


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """The tests' tokenized and validated data (core/data_arrow.py) goes to a folder of their own, not the
    user's `~/.cache/prefalign/data`."""
    old = os.environ.get("PREFALIGN_DATA_CACHE")
    os.environ["PREFALIGN_DATA_CACHE"] = str(tmp_path_factory.mktemp("data-cache"))
    yield
    if old is None:
        os.environ.pop("PREFALIGN_DATA_CACHE", None)
    else:
        os.environ["PREFALIGN_DATA_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """A 1-layer GPT-2 (16 dims) with the reviews world's word-level tokenizer, saved with save_pretrained."""
    path = tmp_path_factory.mktemp("tiny-lm")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=16, n_positions=32,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def pairs_file():
    """write(path, n, subject="pizza") -> path: n distinct prompt/chosen/rejected rows whose prompt names
    `subject` (and the row: `review 3: the pizza place`)."""

    def write(path, n, subject="pizza"):
        rows = [
            {"prompt": f"review {i}: the {subject} place", "chosen": f"the food was {WORDS[i % 6]} .",
             "rejected": f"the food was {WORDS[(i + 1) % 6]} ."}
            for i in range(n)
        ]  # fmt: skip
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    return write


def tour_commands() -> list[list[str]]:
    """The README's tour: the lines of the first ```bash block after '## A short tour', comments removed."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## A short tour.*?```bash\n(.*?)```", text, flags=re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def run_in(folder: Path, command: list[str]):
    """A `prefalign ...` command run in `folder` (through the CLI app, in this process)."""
    from typer.testing import CliRunner

    from prefalign.cli import app

    here = os.getcwd()
    os.chdir(folder)
    try:
        return CliRunner().invoke(app, command[1:])
    finally:
        os.chdir(here)


@pytest.fixture(scope="session")
def tour(tmp_path_factory):
    """A fresh folder with only configs/ in it, where the README tour's first command has run."""
    folder = tmp_path_factory.mktemp("tour")
    (folder / "configs").symlink_to(ROOT / "configs")
    first = tour_commands()[0]
    result = run_in(folder, first)
    assert result.exit_code == 0, (first, result.output[-3000:])
    return folder
