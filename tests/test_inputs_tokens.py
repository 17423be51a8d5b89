"""Special tokens exactly once (issue 11, faults 5 and 16): BOS and EOS, text and chat prompts, tokenizers that
add BOS (and EOS) and ones that add nothing, chat templates that end a turn with EOS, with EOS followed by more
text, or with another token; and `data.chat_template` for tokenizers without one.

Right values are built by hand from the tokenizer's plain `encode(text, add_special_tokens=False)` and the known
special ids of each tokenizer style; log-probs come from a naive batch-1 forward (`inputs_tiny.naive_logp`)."""

import pytest
import torch
from typer.testing import CliRunner

from inputs_tiny import (
    CHATML,
    LLAMA2,
    LN2,
    byte_bpe,
    dpo_config,
    gpt2,
    llama_style,
    naive_logp,
    save,
    train,
    write_config,
    write_jsonl,
)
from prefalign import runner
from prefalign.cli import app
from prefalign.core.data import PreferenceRecord
from prefalign.core.encode import encode_records
from prefalign.core.errors import ConfigError

torch.set_num_threads(1)
USER = [{"role": "user", "content": "Is water wet?"}]
ANSWER = [{"role": "assistant", "content": "Yes, it is."}]
OTHER = [{"role": "assistant", "content": "No."}]


def plain(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def encode_one(tok, prompt, response, other="x"):
    [enc] = encode_records(tok, [PreferenceRecord.pair(prompt, response, other)], 128, 64)
    return enc.prompt_ids, enc.response_ids[0]


# (tokenizer, what it adds before a text): GPT-2 style adds nothing, Llama style adds <s>, and the one whose
# post-processor also appends </s> must still give prompts without a trailing </s>
TEXT_STYLES = {
    "byte_bpe": (lambda: byte_bpe(), False),
    "llama_bos": (lambda: llama_style(), True),
    "llama_bos_eos": (lambda: llama_style(add_eos=True), True),
}


@pytest.mark.parametrize("style", TEXT_STYLES)
def test_text_prompt_gets_bos_once_and_response_eos_once(style):
    make, adds_bos = TEXT_STYLES[style]
    tok = make()
    bos = [tok.bos_token_id] if adds_bos else []
    prompt, response = "Is water wet?", " yes it is."
    prompt_ids, response_ids = encode_one(tok, prompt, response)
    assert prompt_ids == bos + plain(tok, prompt)  # never the EOS a post-processor appends
    assert response_ids == plain(tok, response) + [tok.eos_token_id]
    # a text that already starts with BOS / ends with EOS gets no second one
    if adds_bos:
        prompt_ids, _ = encode_one(tok, "<s>" + prompt, response)
        assert prompt_ids == plain(tok, "<s>" + prompt) and prompt_ids.count(tok.bos_token_id) == 1
    _, response_ids = encode_one(tok, prompt, response + tok.eos_token)
    assert response_ids == plain(tok, response) + [tok.eos_token_id]


# (tokenizer, the rendered response text, whether EOS must be appended to it)
CHAT_STYLES = {
    # ChatML with eos = <|im_end|> (Qwen2.5-Instruct): the template's end of turn IS the EOS, text follows it
    "chatml_eos_im_end": (lambda: byte_bpe("<|im_end|>", CHATML), "Yes, it is.<|im_end|>\n", False),
    # ChatML with eos = <|endoftext|>: the turn ends with another token; EOS is appended once
    "chatml_eos_endoftext": (lambda: byte_bpe("<|endoftext|>", CHATML), "Yes, it is.<|im_end|>\n", True),
    # Llama-2: BOS written by the template, the turn ends with </s>
    "llama2": (lambda: llama_style(chat_template=LLAMA2), " Yes, it is.</s>", False),
    "llama2_eos_postprocessor": (
        lambda: llama_style(add_eos=True, chat_template=LLAMA2),
        " Yes, it is.</s>",
        False,
    ),
}


@pytest.mark.parametrize("style", CHAT_STYLES)
def test_chat_prompt_is_the_template_and_the_response_holds_one_eos(style):
    make, response_text, append = CHAT_STYLES[style]
    tok = make()
    prompt_text = tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    prompt_ids, response_ids = encode_one(tok, USER, ANSWER, OTHER)
    assert prompt_ids == plain(tok, prompt_text)
    assert prompt_ids.count(tok.bos_token_id) == (1 if "llama2" in style else 0)
    assert response_ids == plain(tok, response_text) + ([tok.eos_token_id] if append else [])
    assert response_ids.count(tok.eos_token_id) == 1


@pytest.mark.parametrize("style", ["chatml_eos_im_end", "llama2_eos_postprocessor"])
def test_step1_logps_equal_a_naive_forward_of_the_template_text(tmp_path, style):
    """The run scores log p(template's response text (+ EOS once) | template's prompt): logged
    `logps/chosen` at step 1 equals the naive batch-1 value, and the loss is ln 2 (policy = reference)."""
    make, response_text, append = CHAT_STYLES[style]
    tok = make()
    model = gpt2(tok)
    save(model, tok, tmp_path / "model")
    rows = [{"prompt": USER, "chosen": ANSWER, "rejected": OTHER}] * 4
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    first = train(dpo_config(tmp_path / "model", data, tmp_path / "run"))
    prompt = plain(tok, tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True))
    right = naive_logp(model, prompt, plain(tok, response_text) + ([tok.eos_token_id] if append else []))
    assert first["logps/chosen"] == pytest.approx(right, abs=1e-4)
    assert first["loss"] == pytest.approx(LN2, abs=1e-6)


def test_text_step1_logps_with_a_bos_and_eos_adding_tokenizer(tmp_path):
    tok = llama_style(add_eos=True)
    model = gpt2(tok)
    save(model, tok, tmp_path / "model")
    rows = [{"prompt": "Is water wet?", "chosen": " yes it is.", "rejected": " no."}] * 4
    first = train(dpo_config(tmp_path / "model", write_jsonl(tmp_path / "p.jsonl", rows), tmp_path / "run"))
    right = naive_logp(
        model,
        [tok.bos_token_id] + plain(tok, "Is water wet?"),
        plain(tok, " yes it is.") + [tok.eos_token_id],
    )
    assert first["logps/chosen"] == pytest.approx(right, abs=1e-4)


@pytest.mark.parametrize("as_file", [False, True])
def test_data_chat_template_serves_a_tokenizer_without_one(tmp_path, as_file):
    """`data.chat_template` (Jinja text or a file) renders the chat rows; it is saved with the trained
    tokenizer; the scored log-prob is the naive one of its rendering."""
    tok = byte_bpe("<|im_end|>", chat_template=None)
    model = gpt2(tok)
    save(model, tok, tmp_path / "model")
    rows = [{"prompt": USER, "chosen": ANSWER, "rejected": OTHER}] * 4
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    template = CHATML
    if as_file:
        (tmp_path / "chatml.jinja").write_text(CHATML)
        template = str(tmp_path / "chatml.jinja")
    cfg = dpo_config(tmp_path / "model", data, tmp_path / "run", **{"data.chat_template": template})
    first = train(cfg)
    tok.chat_template = CHATML
    prompt = plain(tok, tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True))
    right = naive_logp(model, prompt, plain(tok, "Yes, it is.<|im_end|>\n"))
    assert first["logps/chosen"] == pytest.approx(right, abs=1e-4)
    assert (tmp_path / "run" / "final" / "chat_template.jinja").read_text() == CHATML or CHATML in (
        tmp_path / "run" / "final" / "tokenizer_config.json"
    ).read_text()


def test_chat_rows_without_any_template_are_one_error_line(tmp_path):
    tok = byte_bpe("<|im_end|>", chat_template=None)
    save(gpt2(tok), tok, tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": USER, "chosen": ANSWER, "rejected": OTHER}] * 4)
    path = write_config(tmp_path / "cfg.yaml", dpo_config(tmp_path / "model", data, tmp_path / "run"))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "data.chat_template" in errors[0] and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # nothing left behind


def test_chat_template_that_is_neither_text_nor_a_file_is_a_config_error(tmp_path):
    cfg = dpo_config("m", "d.jsonl", tmp_path / "run", **{"data.chat_template": str(tmp_path / "none.jinja")})
    with pytest.raises(ConfigError, match="data.chat_template"):
        runner.build_config(cfg)
