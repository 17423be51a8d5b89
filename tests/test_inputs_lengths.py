"""Lengths (issue 11, faults 7, 8 and 17): `max_length` within the model's position limit, truncation counted,
pairs that truncation makes identical dropped (counted) or refused (named), length settings checked with
the config."""

import logging

import pytest
import torch
from typer.testing import CliRunner

from inputs_tiny import LN2, byte_bpe, dpo_config, gpt2, naive_logp, save, train, write_config, write_jsonl
from prefalign import runner
from prefalign.cli import app
from prefalign.core.data import DataConfig, PreferenceRecord
from prefalign.core.encode import encode_data, fit_lengths, position_limit
from prefalign.core.errors import ConfigError, DataError

torch.set_num_threads(1)


def plain(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_max_length_is_lowered_to_the_position_limit_with_one_line(tmp_path, caplog):
    """GPT-2 with 32 positions, default max_length 512 / max_prompt_length 256, a 46-token pair: the run cuts
    sequences to 32 tokens and prompts to 16, says so once, and scores exactly the kept tokens (naive value)."""
    tok = byte_bpe()
    model = gpt2(tok, n_positions=32)
    save(model, tok, tmp_path / "model")
    chosen = " yes it is." * 10
    rows = [{"prompt": "Is water wet?", "chosen": chosen, "rejected": " no, never."}] * 4
    cfg = dpo_config(tmp_path / "model", write_jsonl(tmp_path / "p.jsonl", rows), tmp_path / "run")
    del cfg["data"]["max_length"], cfg["data"]["max_prompt_length"]
    with caplog.at_level(logging.WARNING):
        first = train(cfg)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("position limit 32" in m for m in messages) == 1, messages
    assert any("data.max_length 512" in m and "prompts to 16" in m for m in messages)
    assert any("1 of 4" not in m and "4 of 8 responses cut" in m for m in messages), messages
    prompt = plain(tok, "Is water wet?")
    response = (plain(tok, chosen) + [tok.eos_token_id])[: 32 - len(prompt)]
    assert first["logps/chosen"] == pytest.approx(naive_logp(model, prompt, response), abs=1e-4)
    assert first["loss"] == pytest.approx(LN2, abs=1e-6)


def test_position_limit_of_configs():
    tok = byte_bpe()
    assert position_limit(gpt2(tok, n_positions=48)) == 48
    assert position_limit(torch.nn.Linear(2, 2)) is None
    data = DataConfig(max_length=40, max_prompt_length=30)
    assert fit_lengths(data, gpt2(tok, n_positions=64)) == (40, 30)  # fits: unchanged
    assert fit_lengths(data, gpt2(tok, n_positions=32)) == (32, 30)  # the prompt limit still fits
    too_long = DataConfig(max_length=40, max_prompt_length=35)
    assert fit_lengths(too_long, gpt2(tok, n_positions=32)) == (32, 16)  # it does not: half the limit


def pairs_identical_after(tok, n_prompt_tokens_extra=0):
    prompt = "Human: Is water wet? Assistant:"
    chosen, rejected = " yes it is. The sky is blue today.", " yes it is. The river is dry."
    c, r = plain(tok, chosen), plain(tok, rejected)
    shared = next(i for i, (x, y) in enumerate(zip(c, r)) if x != y)
    return prompt, chosen, rejected, len(plain(tok, prompt)) + shared


def test_pairs_identical_after_truncation_are_refused_by_name_or_skipped_and_counted(caplog):
    tok = byte_bpe()
    prompt, chosen, rejected, cut = pairs_identical_after(tok)
    records = [PreferenceRecord.pair(prompt, chosen, rejected) for _ in range(3)]
    records += [PreferenceRecord.pair(prompt, " ok.", " no.")]
    for i, r in enumerate(records):
        r.origin = f"p.jsonl row {i} (line {i + 1})"
    data = DataConfig(max_length=cut, max_prompt_length=cut - 1)
    with pytest.raises(DataError) as info:
        encode_data(tok, records, data, "data.train", (cut, cut - 1))
    message = str(info.value)
    assert "3 of 4 records" in message and "p.jsonl row 0 (line 1)" in message and "\n" not in message
    assert "data.on_bad_row: skip" in message
    skip = DataConfig(max_length=cut, max_prompt_length=cut - 1, on_bad_row="skip")
    with caplog.at_level(logging.WARNING):
        kept = encode_data(tok, records, skip, "data.train", (cut, cut - 1))
    assert kept.kept == [3] and len(kept) == 1
    assert any("skipped 3 of 4 records" in r.getMessage() for r in caplog.records)
    # one token more and they differ: nothing dropped
    assert len(encode_data(tok, records, skip, "data.train", (cut + 1, cut - 1))) == 4


def test_a_ranking_whose_ranked_responses_become_identical_is_caught_too():
    tok = byte_bpe()
    prompt, chosen, rejected, cut = pairs_identical_after(tok)
    ranked = PreferenceRecord(prompt, [chosen, " ok.", rejected], [0, 1, 2])
    unranked_tie = PreferenceRecord(prompt, [" ok.", chosen, rejected], [0])  # equal unranked: fine
    data = DataConfig(max_length=cut, max_prompt_length=cut - 1)
    with pytest.raises(DataError, match="1 of 1 records"):
        encode_data(tok, [ranked], data, "data.train", (cut, cut - 1))
    assert len(encode_data(tok, [unranked_tie], data, "data.train", (cut, cut - 1))) == 1


def test_truncation_counts_prompts_and_responses(caplog):
    tok = byte_bpe()
    records = [PreferenceRecord.pair("the cat sat on the mat " * 8, " yes.", " no.")]
    records += [PreferenceRecord.pair("Hi", " the dog sat on the mat" * 8, " no.")]
    with caplog.at_level(logging.WARNING):
        encode_data(tok, records, DataConfig(), "data.train", (24, 8))
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("data.train: 1 of 2 prompts cut to their last 8 tokens")
    assert "1 of 4 responses cut to fit data.max_length 24" in line


def test_length_settings_are_checked_with_the_config(tmp_path):
    """max_prompt_length >= max_length fails when the config is read, before any model is loaded."""
    cfg = dpo_config(tmp_path / "no-model", "none.jsonl", tmp_path / "run")
    cfg["data"].update(max_length=32, max_prompt_length=32)
    with pytest.raises(
        ConfigError, match=r"data.max_prompt_length' \(32\) must be >= 1 and < data.max_length"
    ):
        runner.build_config(cfg)
    path = write_config(tmp_path / "cfg.yaml", cfg)
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2 and result.output.count("error:") == 1 and "Traceback" not in result.output
