"""Per-sequence SDPA (trainer.packed_attention) against transformers' own sdpa: same outputs, same gradients."""

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from trainer import packed_attention


def _pair(heads=4, kv_heads=4, checkpointing=False):
    """A tiny Llama under transformers' sdpa and its copy switched to per-sequence SDPA."""
    config = LlamaConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=96, max_position_embeddings=512,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config)
    ours = copy.deepcopy(reference)
    assert packed_attention.use_for(ours)
    assert ours.config._attn_implementation == packed_attention.NAME
    assert reference.config._attn_implementation == "sdpa"
    for model in (reference, ours):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    return reference, ours


def _positions(rows: list[list[int]]) -> torch.Tensor:
    """(B, T) position ids of rows packed with sequences of these lengths."""
    return torch.tensor([[p for n in row for p in range(n)] for row in rows])


def _sdpa_calls(monkeypatch) -> list[tuple]:
    """Record the (shape, is_causal, masked) of every SDPA call per-sequence attention makes."""
    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((tuple(q.shape), is_causal, attn_mask is not None))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(packed_attention, "F", SimpleNamespace(scaled_dot_product_attention=spy))
    return calls


def _assert_same(reference, ours, input_ids, **inputs):
    a = reference(input_ids=input_ids, use_cache=False, **inputs).logits
    b = ours(input_ids=input_ids, use_cache=False, **inputs).logits
    torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
    weights = torch.randn_like(a)
    (a * weights).sum().backward()
    (b * weights).sum().backward()
    for (name, p), q in zip(reference.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=2e-5, rtol=1e-4, msg=name)


# rows of 384 tokens: many short sequences (gathered: buckets), two long ones (the block mask), one each (plain)
SHORT = [[5, 9, 1, 20, 3, 26] * 6, [17, 17, 17, 13] * 6, [8] * 48]
LONG = [[180, 204], [240, 144], [193, 191]]


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_packed_rows_equal_transformers_sdpa_in_outputs_and_gradients(monkeypatch, kv_heads, checkpointing):
    reference, ours = _pair(kv_heads=kv_heads, checkpointing=checkpointing)
    positions = _positions(SHORT)
    plan = packed_attention.layout(positions)
    # 108 sequences, each bucket's longest at most twice its shortest: 17-26 tokens, 8-13, 3-5, 1
    assert [tuple(index.shape) for index in plan.buckets] == [(30, 26), (60, 13), (12, 5), (6, 1)]
    # every token's output is read from the slot that computed it
    flat = torch.cat([index.reshape(-1) for index in plan.buckets])
    assert torch.equal(flat[plan.slots], torch.arange(3 * 384))
    calls = _sdpa_calls(monkeypatch)
    torch.manual_seed(1)
    _assert_same(reference, ours, torch.randint(0, 97, positions.shape), position_ids=positions)
    # every call is the unmasked causal kernel over one bucket, in each layer's forward (and its recompute)
    assert calls and all(causal and not masked for _, causal, masked in calls)
    assert {shape[0] for shape, _, _ in calls} == {index.shape[0] for index in plan.buckets}


def test_rows_of_few_long_sequences_run_with_the_block_mask_and_rows_of_one_as_they_are(monkeypatch):
    reference, ours = _pair()
    calls = _sdpa_calls(monkeypatch)
    long = _positions(LONG)
    assert packed_attention.layout(long).mask is not None and not packed_attention.layout(long).buckets
    # short rows save too few keys per query to pay for gathering, however short their sequences
    short_rows = packed_attention.layout(_positions([[8] * 16] * 3))
    assert short_rows.mask is not None and not short_rows.buckets
    _assert_same(reference, ours, torch.randint(0, 97, long.shape), position_ids=long)
    assert calls and all(masked and not causal and shape[0] == 3 for shape, causal, masked in calls)
    calls.clear()
    reference.zero_grad(), ours.zero_grad()
    _assert_same(reference, ours, torch.randint(0, 97, (3, 384)))  # no position ids: one sequence per row
    assert calls and all(causal and not masked and shape[0] == 3 for shape, causal, masked in calls)


def test_padding_masks_and_generation_go_to_transformers_sdpa(monkeypatch):
    reference, ours = _pair()
    reference.eval(), ours.eval()
    calls = _sdpa_calls(monkeypatch)
    ids = torch.randint(1, 97, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding, as rollouts are padded
    _assert_same(reference, ours, ids, attention_mask=mask)
    assert not calls  # the padding mask went to transformers' sdpa whole
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(ours.generate(input_ids=ids, attention_mask=mask, **settings),
                       reference.generate(input_ids=ids, attention_mask=mask, **settings))


def test_attention_with_a_sliding_window_stays_on_transformers_sdpa():
    config = MistralConfig(vocab_size=97, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=4, intermediate_size=96, sliding_window=16, attn_implementation="sdpa")
    model = MistralForCausalLM(config)
    assert not packed_attention.use_for(model)
    assert model.config._attn_implementation == "sdpa"
    assert packed_attention.unsupported(model.config) == "it has a sliding window"  # what the load line says


def test_tuneforge_models_use_it_unless_switched_off(capsys):
    from trainer.config import ModelConfig
    from trainer.model import build_causal_lm, build_reward_model, load_tokenizer

    tokenizer = load_tokenizer(ModelConfig())
    assert build_causal_lm(ModelConfig(), tokenizer, torch.float32).config._attn_implementation == packed_attention.NAME
    assert "attention: sdpa per packed sequence" in capsys.readouterr().out
    scorer = build_reward_model(ModelConfig(), tokenizer, torch.float32)
    assert scorer.config._attn_implementation == packed_attention.NAME
    capsys.readouterr()
    off = build_causal_lm(ModelConfig(per_sequence_attention=False), tokenizer, torch.float32)
    assert off.config._attn_implementation == "sdpa"
    assert "per packed sequence" not in capsys.readouterr().out
