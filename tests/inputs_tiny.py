"""Tiny local tokenizers, models and runs for the `test_inputs_*` files (nothing downloads).

byte_bpe()     GPT-2 style byte-level BPE: no BOS added; eos '<|endoftext|>' or any of its specials
llama_style()  SentencePiece-like Metaspace BPE; a post-processor adds <s> (and optionally </s>) like Llama-2
naive_logp()   log p(response | prompt) from ONE plain batch-1 forward of prompt + response and log_softmax,
               written independently of prefalign's encoding and batching
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

LN2 = 0.6931471805599453
WORDS = (
    "the a cat dog sat on mat yes yeah no it is was good bad answer question water wet dry sky blue red "
    "green tree river book read write human assistant hello world please thanks sure maybe never always"
).split()
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-2 style: BOS written by the template, assistant turns end with the EOS token
LLAMA2 = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)


def corpus(n=300, seed=0):
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) + "." for _ in range(n)]
    return lines + ["Human: Is water wet?", "Assistant: yes it is.", "Assistant: yeah no."] * 20


def byte_bpe(eos="<|endoftext|>", chat_template=None):
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus(), trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=eos,
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = chat_template
    return tok


def llama_style(add_eos=False, chat_template=None):
    sp = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    sp.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    sp.train_from_iterator(corpus(), trainer)
    bos, eos = sp.token_to_id("<s>"), sp.token_to_id("</s>")
    single = "<s> $A </s>" if add_eos else "<s> $A"
    pair = "<s> $A </s> <s> $B </s>" if add_eos else "<s> $A <s> $B"
    sp.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tok.chat_template = chat_template
    return tok


def gpt2(tok, seed=0, **overrides):
    """A random 2-layer GPT-2 whose logits vary enough that a wrong token shows in the log-probs."""
    torch.manual_seed(seed)
    config = dict(
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=128,
        vocab_size=len(tok),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = GPT2LMHeadModel(GPT2Config(**{**config, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    return model.eval()


def save(model, tok, path: Path) -> Path:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@torch.no_grad()
def naive_logp(model, prompt_ids, response_ids) -> float:
    """sum_t log p(y_t | x, y_<t): one sequence, batch 1, no padding, no mask, train/eval mode as it is."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    n = len(prompt_ids)
    return float(sum(logp[n + t - 1, y] for t, y in enumerate(response_ids)))


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dpo_config(model_dir, data, out, **over) -> dict:
    """A `method: dpo` config (1 step, tiny learning rate); `over` maps 'section.key' -> value."""
    cfg = {
        "method": "dpo",
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(data), "eval_fraction": 0.0, "max_length": 64, "max_prompt_length": 32},
        "loss": {"name": "dpo", "beta": 0.1},
        "train": {
            "output_dir": str(out),
            "max_steps": 1,
            "batch_size": 4,
            "learning_rate": 1e-6,
            "log_every": 1,
            "progress": False,
        },
    }
    for key, value in over.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train(cfg: dict, **inputs):
    """`runner.run` of a config dict -> its first metrics line."""
    from prefalign import runner

    result = runner.run(runner.build_config(cfg), **inputs)
    return result.history[0]


def one_error_line(result, *needles):
    """A CLI result that failed with exactly one `error:` line (exit 2, no traceback) containing `needles`."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert all(n in errors[0] for n in needles), errors[0]
    return errors[0]
