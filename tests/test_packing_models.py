"""The packed layout on models whose mask is more than causal: sliding windows (Mistral, Qwen2 with
`use_sliding_window`, Gemma2/3 with their per-layer patterns), Gemma2's attention-logit softcapping; every
attention path (flex, blocks, loop). The right value is an independent naive computation: each prompt +
response alone, batch 1, no padding, eager attention, log_softmax, summed over the response tokens.

And the decision around it: check_packing uses the longest records and a dtype tolerance; a model that
cannot run the packed layout trains on padded batches with one line saying so."""

import math

import pytest
import torch
from transformers import (
    FalconConfig,
    FalconForCausalLM,
)

from packing_models import BASE, V, build, naive_matrix, records
from prefalign.core import packing
from prefalign.core.logprobs import (
    check_packing,
    choose_layout,
    collate,
    collate_packed,
    longest_records,
    sequence_logps,
)

torch.set_num_threads(1)


@pytest.fixture
def path(request, monkeypatch):
    monkeypatch.setenv("PREFALIGN_PACKED_ATTENTION", request.param)
    return request.param


ARCHS = ["llama", "mistral", "qwen2", "gemma2", "gemma3"]


@pytest.mark.parametrize("path", ["blocks", "loop"], indirect=True)
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_logps_and_gradients_equal_the_naive_computation(arch, path):
    model = build(arch).train()  # dropout is 0: train mode changes nothing but exercises the training path
    data = records()
    with torch.no_grad():
        naive = naive_matrix(model, data)
    for share_prompt in (True, False):
        with torch.no_grad():
            packed, n = sequence_logps(model, collate_packed(data, share_prompt=share_prompt))
        for b, row in enumerate(naive):
            for j, value in enumerate(row):
                assert float(packed[b, j]) == pytest.approx(float(value), abs=1e-4), (b, j, share_prompt)
                assert int(n[b, j]) == len(data[b].response_ids[j])
    # gradients of a weighted sum of log-probs, packed vs naive
    weights = torch.tensor([[0.7, -1.3, 0.0], [1.1, 0.5, -0.8], [0.3, -0.2, 0.9]])
    params = [p for p in model.parameters() if p.requires_grad]

    def grad(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])

    g_packed = grad((sequence_logps(model, collate_packed(data))[0] * weights).sum())
    g_naive = grad(
        sum(weights[b, j] * v for b, row in enumerate(naive_matrix(model, data)) for j, v in enumerate(row))
    )
    assert float((g_packed - g_naive).norm() / g_naive.norm()) < 1e-4


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "gemma2", "gemma3"])
def test_the_window_matters_here(arch):
    """The same weights with a window longer than every sequence give other log-probs: the tests above
    would fail if the packed layout dropped the window (as it did: Mistral padded -44.73, packed -45.76)."""
    model, wide = build(arch), build(arch, sliding_window=4096)
    wide.load_state_dict(model.state_dict())
    with torch.no_grad():
        a, b = naive_matrix(model, records()), naive_matrix(wide, records())
    assert max(abs(float(x) - float(y)) for r, s in zip(a, b) for x, y in zip(r, s)) > 0.1


@pytest.mark.filterwarnings("ignore:flex_attention called without")
@pytest.mark.parametrize("path", ["flex"], indirect=True)
@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3"])
def test_flex_path_equals_the_naive_computation(arch, path):
    """flex_attention with the BlockMask built from (record, segment, position, the model's window) and a
    softcap score_mod. On CPU torch runs its unfused reference flex (forward only); CUDA compiles it."""
    model = build(arch)
    data = records()
    with torch.no_grad():
        packed, _ = sequence_logps(model, collate_packed(data))
        naive = naive_matrix(model, data)
    for b, row in enumerate(naive):
        for j, value in enumerate(row):
            assert float(packed[b, j]) == pytest.approx(float(value), abs=1e-4)


def test_paths_choose_by_device_and_waste(monkeypatch):
    """CPU: blocks unless they would be mostly padding (one long record among short ones) or attention
    dropout is on in training -> loop."""
    monkeypatch.delenv("PREFALIGN_PACKED_ATTENTION", raising=False)
    model = build("llama")
    assert packing.choose_path(model, collate_packed(records())) == "blocks"
    skewed = records(lengths=((60, 60), (1, 1), (1, 1), (1, 1), (1, 1), (1, 1)))
    assert packing.choose_path(model, collate_packed(skewed)) == "loop"
    dropout = build("llama", attention_dropout=0.1)
    assert packing.choose_path(dropout.eval(), collate_packed(records())) == "blocks"
    assert packing.choose_path(dropout.train(), collate_packed(records())) == "loop"


def short_and_long():
    """Four short records first (all inside the window), then one long one: the order of a file where the
    old check (first four records) saw nothing wrong."""
    short = records(seed=1, lengths=((1, 2, 1),) * 4)
    return short + records(seed=2, lengths=((8, 12, 3),))


def drop_the_window(monkeypatch):
    """Re-create the old fault: the packed mask ignores the model's rule beyond causality."""
    monkeypatch.setattr(packing, "_apply", lambda fn, q, kv: kv <= q)


def test_check_packing_checks_the_longest_records(monkeypatch):
    data = short_and_long()
    assert longest_records(data)[-1] is data[-1]
    model = build("mistral")
    check_packing(model, data, pad_token_id=0)  # the right packed layout passes
    drop_the_window(monkeypatch)
    check_packing(model, data[:4], pad_token_id=0)  # a fault invisible in short records...
    with pytest.raises(packing.PackingUnsupported, match="data.packing: false"):
        check_packing(model, data, pad_token_id=0)  # ...is caught because the longest one is checked


def test_bfloat16_rounding_is_not_a_packing_fault_but_a_dropped_window_still_is(monkeypatch):
    """Qwen2 in bfloat16: packed and padded differ by bf16 rounding (more than the float32 tolerance 1e-4,
    the old false alarm); check_packing passes. A real fault (the window dropped) still fails in bfloat16."""
    model = build("qwen2").to(torch.bfloat16)
    data = records(seed=3, lengths=((12, 10, 10),) * 4)
    with torch.no_grad():
        a, n = sequence_logps(model, collate(data, 0))
        b, _ = sequence_logps(model, collate_packed(data))
    gap = float(((a - b) / n).abs().max())
    assert 1e-4 < gap < 2e-2
    check_packing(model, data, pad_token_id=0)
    drop_the_window(monkeypatch)
    with pytest.raises(packing.PackingUnsupported):
        check_packing(model, data, pad_token_id=0)


def falcon(vocab=V):
    torch.manual_seed(0)
    config = FalconConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        hidden_dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    return FalconForCausalLM(config)


def test_model_without_attention_interface_falls_back_with_one_line(capsys):
    model = falcon()
    assert packing.support(model) is not None
    assert choose_layout(model, records(), pad_token_id=0) is False
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("data.packing: FalconForCausalLM has no attention")
    assert choose_layout(build("gemma2"), records(), pad_token_id=0) is True  # softcapping is supported


def test_dpo_run_on_falcon_with_default_packing_trains_padded(tmp_path, capsys):
    """Default data.packing: true on a model without the interface: one line, then a normal run whose
    step-1 loss is ln 2 (policy = reference) - no traceback after the reference cache is written."""
    from prefalign import runner
    from prefalign.core.data import PreferenceRecord
    from prefalign.methods import dpo
    from prefalign.worlds.reviews import build_tokenizer

    tokenizer = build_tokenizer()
    words = [w for w in sorted(tokenizer.get_vocab()) if w.isalpha()][:10]
    g = torch.Generator().manual_seed(0)

    def text(n):
        return " ".join(words[i] for i in torch.randint(len(words), (n,), generator=g).tolist())

    data = [PreferenceRecord.pair(text(4), text(5), text(3)) for _ in range(8)]
    cfg = dpo.Config()
    assert cfg.data.packing is True
    cfg.train.output_dir = str(tmp_path / "run")
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.log_every, cfg.train.progress = 2, 4, 1, False
    result = runner.run(cfg, records=data, eval_records=[], model=falcon(len(tokenizer)), tokenizer=tokenizer)
    assert "data.packing: FalconForCausalLM" in capsys.readouterr().err
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert (tmp_path / "run" / "final").is_dir()


def granite():
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    config = GraniteConfig(**BASE, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=4.0)
    return GraniteForCausalLM(config).eval()


def cohere():
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(0)
    return CohereForCausalLM(CohereConfig(**BASE, logit_scale=0.5)).eval()


@pytest.mark.parametrize("make", [lambda: build("gemma2"), lambda: build("llama"), granite, cohere])
def test_vocabulary_chunks_give_the_naive_logps_and_gradients(make, monkeypatch):
    """Response-token log-probs 3 tokens at a time (recomputed in backward), with the model's final-logit
    map (Gemma2 softcap, Granite logits_scaling, Cohere logit_scale): equal to the naive computation, and the
    LM head never sees more than 3 tokens at once (no [tokens, vocab] tensor)."""
    from prefalign.core import vocab

    monkeypatch.setattr(vocab, "CHUNK_ELEMENTS", 3 * V)
    model = make().train()
    data = records()
    widths = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, out: widths.append(out.shape[-2]))
    logps, _ = sequence_logps(model, collate_packed(data))
    weights = torch.randn(logps.shape, generator=torch.Generator().manual_seed(0))
    model.zero_grad()
    (logps * weights).sum().backward()
    hook.remove()
    g_chunked = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert max(widths) == 3
    model.zero_grad()
    naive = naive_matrix(model, data)
    sum(weights[b, j] * v for b, row in enumerate(naive) for j, v in enumerate(row)).backward()
    g_naive = torch.cat([p.grad.flatten() for p in model.parameters()])
    for b, row in enumerate(naive):
        for j, value in enumerate(row):
            assert float(logps[b, j]) == pytest.approx(float(value), abs=1e-4)
    assert float((g_chunked - g_naive).norm() / g_naive.norm()) < 1e-4


def test_attention_argument_not_implemented_falls_back_before_any_work(capsys):
    """GPT-OSS passes attention sinks (`s_aux`) that the packed attention does not implement: the check
    before training says so in one line and the padded layout is used (instead of a traceback later)."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    config = GptOssConfig(
        vocab_size=V, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
        pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip
    model = GptOssForCausalLM(config).eval()
    assert packing.support(model) is None  # it has the interface; what it passes is the problem
    assert choose_layout(model, records(), pad_token_id=0) is False
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("data.packing")]
    assert len(lines) == 1 and "s_aux" in lines[0]
