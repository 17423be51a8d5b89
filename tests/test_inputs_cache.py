"""The reference log-prob cache is keyed by everything that changes what it holds (issue 11, fault 14).

Every input of the reference's forward pass: token ids (chat template, max lengths, truncation), weights,
the model config (same weights, another config), dtype, attention implementation, adapters (active, disabled,
merged), summed vs averaged log-probs, the batch layout. End to end: runs sharing one `model.reference.cache_dir`
change one input at a time; each must compute afresh (a new cache file) and start at loss ln 2, which holds
only when the reference log-probs are those of the policy as it starts."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from inputs_tiny import CHATML, LN2, byte_bpe, dpo_config, gpt2, save, train, write_jsonl
from prefalign.core.data import PreferenceRecord
from prefalign.core.encode import encode_records
from prefalign.core.logprobs import collate, sequence_logps
from prefalign.core.reference import cache_key, precompute_reference_logps

torch.set_num_threads(1)
USER = [{"role": "user", "content": "Is water wet? Tell me about the sky and the river."}]
OTHER_TEMPLATE = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
OTHER_TEMPLATE += "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    tok = byte_bpe("<|im_end|>", CHATML)
    model = gpt2(tok)
    save(model, tok, root / "model")
    # the same weights under a config that changes the forward (attention scaled by 1/layer index)
    variant = copy.deepcopy(model)
    variant.config.scale_attn_by_inverse_layer_idx = True
    save(variant, tok, root / "model-config-variant")
    rows = [
        {
            "prompt": USER,
            "chosen": [{"role": "assistant", "content": f"Yes, it is wet {i} and the sky is blue."}],
            "rejected": [{"role": "assistant", "content": "No."}],
        }
        for i in range(4)
    ]
    return root, write_jsonl(root / "pairs.jsonl", rows)


VARIANTS = {
    "baseline": {},
    "average_logps": {"loss.average_logps": True},
    "chat_template": {"data.chat_template": OTHER_TEMPLATE},
    "max_length": {"data.max_length": 24, "data.max_prompt_length": 20},
    "max_prompt_length": {"data.max_prompt_length": 6},
    "model_config": {"model.name_or_path": "model-config-variant"},
    "packed_vs_padded": {"data.packing": False},
}


def test_each_input_of_the_reference_forward_gets_a_fresh_cache(tmp_path, setup):
    root, data = setup
    cache = tmp_path / "shared-cache"
    files = 0
    for name, change in VARIANTS.items():
        change = dict(change)
        model_dir = root / change.pop("model.name_or_path", "model")
        cfg = dpo_config(
            model_dir, data, tmp_path / name, **{"model.reference.cache_dir": str(cache), **change}
        )
        first = train(cfg)
        assert first["loss"] == pytest.approx(LN2, abs=1e-5), name
        now = len(list(cache.glob("reference_logps-*.safetensors")))
        # a changed input computes afresh; the layout of the policy's batches does not change the cache
        assert now == files + (0 if name == "packed_vs_padded" else 1), name
        files = now
    again = train(
        dpo_config(root / "model", data, tmp_path / "again", **{"model.reference.cache_dir": str(cache)})
    )
    assert again["loss"] == pytest.approx(LN2, abs=1e-5)
    assert len(list(cache.glob("reference_logps-*.safetensors"))) == files  # the identical run reads it


def encoded_records(tok):
    records = [PreferenceRecord.pair("the cat sat", " on the mat.", " no.") for _ in range(3)]
    return encode_records(tok, records, 32, 16)


def test_the_key_covers_config_dtype_attention_and_adapter_state(tmp_path):
    tok = byte_bpe()
    model = gpt2(tok)
    encoded = encoded_records(tok)
    save(model, tok, tmp_path / "a")
    key = cache_key(model, encoded, False)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")  # another path, same model: same key
    assert cache_key(reloaded.eval(), encoded, False) == key
    assert cache_key(model, encoded, True) != key  # averaged log-probs
    other = copy.deepcopy(model)
    other.config.scale_attn_by_inverse_layer_idx = True  # same weights, other forward
    assert cache_key(other, encoded, False) != key
    other = copy.deepcopy(model)
    other.config._attn_implementation = "eager" if model.config._attn_implementation != "eager" else "sdpa"
    assert cache_key(other, encoded, False) != key
    assert cache_key(copy.deepcopy(model).to(torch.bfloat16), encoded, False) != key


def test_adapters_enabled_and_disabled_are_cached_apart(tmp_path):
    """The same PeftModel (same state dict) with its trained adapter on and off computes different log-probs;
    one shared cache directory must give each its own values (checked against a live computation)."""
    tok = byte_bpe()
    peft_model = get_peft_model(
        gpt2(tok),
        LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False, fan_in_fan_out=True),
    ).eval()
    encoded = encoded_records(tok)
    batch = collate(encoded, tok.pad_token_id)
    with torch.no_grad():
        live_on = sequence_logps(peft_model, batch)[0]
        with peft_model.disable_adapter():
            live_off = sequence_logps(peft_model, batch)[0]
    assert (live_on - live_off).abs().max() > 1e-2
    with peft_model.disable_adapter():
        off = precompute_reference_logps(
            peft_model, encoded, pad_token_id=tok.pad_token_id, cache_dir=tmp_path
        )
    on = precompute_reference_logps(peft_model, encoded, pad_token_id=tok.pad_token_id, cache_dir=tmp_path)
    torch.testing.assert_close(torch.tensor(off)[:, :2], live_off, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(on)[:, :2], live_on, rtol=0, atol=1e-5)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert json.dumps(off) != json.dumps(on)
