import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_model

import minimind.model.model
from minimind.model.config import PRESETS, ModelConfig, minimind_ffn_size
from minimind.model.model import (
    FeedForward,
    KVCache,
    MiniMindForCausalLM,
    MoEFeedForward,
    attention_mask_for,
    grouped_query_attention,
    position_ids_for,
    precompute_rope,
)


def count_parameters(preset: str, active: bool = False) -> int:
    with torch.device("meta"):
        return MiniMindForCausalLM(ModelConfig.from_name(preset)).num_parameters(active=active)


def test_preset_parameter_counts():
    assert count_parameters("minimind2-small") == 25_829_888  # MiniMind2-Small: 25.83M
    assert round(count_parameters("minimind2") / 1e6, 1) == 104.0
    assert round(count_parameters("minimind2-moe") / 1e6) == 145
    # top-2 of 4 routed experts are active, plus the shared one and everything else
    assert count_parameters("minimind2-moe", active=True) < count_parameters("minimind2-moe")
    assert count_parameters("tiny") < 1_000_000


def test_preset_shapes_follow_minimind():
    small = PRESETS["minimind2-small"]
    assert (small.hidden_size, small.num_hidden_layers, small.num_attention_heads, small.num_key_value_heads) == (512, 8, 8, 2)
    assert small.intermediate_size == 1408 and small.vocab_size == 6400 and small.rope_theta == 1e6
    assert PRESETS["minimind2"].intermediate_size == 2048
    assert PRESETS["minimind2-moe"].intermediate_size == minimind_ffn_size(640) == 1728
    assert ModelConfig.from_name("tiny", hidden_size=512).intermediate_size == 1408  # derived again, not kept
    with pytest.raises(KeyError, match="unknown preset"):
        ModelConfig.from_name("gpt-5")
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig(num_attention_heads=8, num_key_value_heads=3)


def test_embedding_is_tied_to_the_output_head(tiny_model):
    assert tiny_model.lm_head.weight is tiny_model.model.embed_tokens.weight


def test_changing_a_token_never_changes_earlier_logits(tiny_model):
    ids = torch.randint(3, 6400, (2, 24))
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 6400
    with torch.no_grad():
        before, after = tiny_model(ids).logits, tiny_model(changed).logits
    torch.testing.assert_close(before[:, :10], after[:, :10], rtol=0, atol=1e-6)
    assert (before[:, 10:] - after[:, 10:]).abs().max() > 1e-3  # the change is visible from t on


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_left_padding_does_not_change_real_token_logits(preset):
    model = random_model(preset)
    ids = torch.randint(3, 6400, (1, 12))
    padded = torch.cat([torch.randint(3, 6400, (1, 5)), ids], dim=1)  # garbage under the padding
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = model(ids).logits
        in_batch = model(padded, mask).logits[:, 5:]
    torch.testing.assert_close(in_batch, alone, rtol=0, atol=1e-5)


def test_left_padded_rows_count_positions_from_their_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_for(mask, torch.arange(5)).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    decoding = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    assert position_ids_for(decoding, torch.tensor([5])).tolist() == [[3], [5]]
    assert position_ids_for(None, torch.arange(5, 7)).tolist() == [[5, 6]]


def test_attention_equals_sdpa_reference():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 6, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    k_full, v_full = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
    ours = grouped_query_attention(q, k, v, None, is_causal=True)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True), rtol=1e-5, atol=1e-5)

    padding = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    allowed = attention_mask_for(padding, torch.arange(6), key_len=6)
    ours = grouped_query_attention(q, k, v, allowed, is_causal=False)
    reference = F.scaled_dot_product_attention(q, k_full, v_full, attn_mask=allowed[:, None])
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(ours).all()  # padding queries stay finite

    # decoding one query against 5 cached keys: no mask at all
    ours = grouped_query_attention(q[:, :, -1:], k, v, None, is_causal=False)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q[:, :, -1:], k_full, v_full), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_batch", [2, 1])
def test_sdpa_path_with_a_mask_equals_the_reference(monkeypatch, mask_batch):
    """With a mask, the SDPA path stacks each K/V head's query group (no K/V copy, the efficient kernel on CUDA)."""
    monkeypatch.setattr(minimind.model.model, "ATTENTION_KERNEL", "sdpa")
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 3, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    allowed = torch.rand(mask_batch, 3, 7) > 0.3
    allowed[..., -1] = True  # every query sees at least one key
    reference = F.scaled_dot_product_attention(
        q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=allowed[:, None]
    )
    torch.testing.assert_close(grouped_query_attention(q, k, v, allowed, False), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_sdpa_path_gives_the_cpu_kernels_outputs_and_gradients(monkeypatch, preset):
    """The path CUDA takes, forced on CPU: causal training rows, left-padded rows, KV-cached decoding
    behind left padding, and the gradients of a training step, all as the CPU kernel computes them."""
    model = random_model(preset).train()
    ids = torch.randint(3, 6400, (2, 12))
    padding = torch.tensor([[0, 0, 0] + [1] * 9, [1] * 12])

    def run():
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        with torch.no_grad():
            padded = model(ids, padding).logits
            cache = KVCache(max_length=12)
            steps = [model(ids[:, :8], padding[:, :8], kv_cache=cache).logits]
            for position in range(8, 12):
                steps.append(model(ids[:, position : position + 1], padding[:, : position + 1], kv_cache=cache).logits)
        return loss, grads, padded, torch.cat(steps, dim=1)

    cpu_kernel = run()
    monkeypatch.setattr(minimind.model.model, "ATTENTION_KERNEL", "sdpa")
    sdpa = run()
    torch.testing.assert_close(sdpa[0], cpu_kernel[0], rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(sdpa[1], cpu_kernel[1]):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sdpa[2][1], cpu_kernel[2][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sdpa[2][0, 3:], cpu_kernel[2][0, 3:], rtol=1e-5, atol=1e-5)  # real positions of the padded row
    torch.testing.assert_close(sdpa[3][:, 3:], cpu_kernel[3][:, 3:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sdpa[3][:, 3:], sdpa[2][:, 3:], rtol=1e-4, atol=1e-4)  # cached decoding = full recomputation


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_kv_cached_decoding_equals_full_recomputation(preset):
    model = random_model(preset)
    ids = torch.randint(3, 6400, (2, 16))
    cache = KVCache(max_length=16)
    with torch.no_grad():
        full = model(ids).logits
        steps = [model(ids[:, :10], kv_cache=cache).logits]
        for position in range(10, 16):
            steps.append(model(ids[:, position : position + 1], kv_cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-4)
    assert cache.length == 16
    with pytest.raises(ValueError, match="KV cache holds 16"):
        model(ids[:, :1], kv_cache=cache)


def test_kv_cache_is_preallocated_and_written_in_place(tiny_model):
    cache = KVCache(max_length=20)
    with torch.no_grad():
        tiny_model(torch.randint(3, 6400, (1, 5)), kv_cache=cache)
        buffer = cache.keys[0]
        tiny_model(torch.randint(3, 6400, (1, 1)), kv_cache=cache)
    assert cache.keys[0] is buffer and buffer.shape[2] == 20  # same storage, no re-concatenation
    assert cache.length == 6


def test_labels_give_the_mean_next_token_cross_entropy(tiny_model):
    ids = torch.randint(3, 6400, (2, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        out = tiny_model(ids, labels=labels)
        logits = tiny_model(ids).logits
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    assert out.logits is None


def test_rope_tables_stay_fp32_when_the_model_is_cast(tiny_model):
    reference = tiny_model.model.rope_cos.clone()
    tiny_model.to(torch.bfloat16)
    assert tiny_model.model.rope_cos.dtype == torch.float32
    assert torch.equal(tiny_model.model.rope_cos, reference)


def test_yarn_keeps_fast_frequencies_and_stretches_slow_ones():
    plain = ModelConfig.from_name("tiny")
    yarn = ModelConfig.from_name("tiny", rope_scaling={"factor": 4.0, "original_max_position_embeddings": 256})
    (plain_cos, _), (yarn_cos, _) = precompute_rope(plain), precompute_rope(yarn)
    attention_factor = 0.1 * math.log(4.0) + 1.0
    # pair 0 rotates fastest: kept as trained (up to YaRN's attention factor)
    torch.testing.assert_close(yarn_cos[:, 0], plain_cos[:, 0] * attention_factor)
    # the slowest pair is interpolated: position 4p under YaRN turns like position p did
    half = plain.head_dim // 2
    slowest = half - 1
    torch.testing.assert_close(yarn_cos[400, slowest], plain_cos[100, slowest] * attention_factor, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- mixture of experts


def moe_layer(num_experts=4, top_k=2, shared=0, seed=0) -> MoEFeedForward:
    torch.manual_seed(seed)
    config = ModelConfig.from_name("tiny", num_experts=num_experts, num_experts_per_tok=top_k, num_shared_experts=shared)
    return MoEFeedForward(config)


def test_moe_routes_each_token_to_its_top_k_experts():
    layer = moe_layer(num_experts=4, top_k=2, shared=1)
    x = torch.randn(2, 5, 64)
    output, _ = layer(x)
    tokens = x.reshape(-1, 64)
    probs = layer.gate(tokens).softmax(-1)
    weights, chosen = probs.topk(2, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    expected = torch.stack(
        [
            sum(w * layer.experts[e](t) for w, e in zip(weights[i], chosen[i].tolist())) + layer.shared_experts[0](t)
            for i, t in enumerate(tokens)
        ]
    )
    torch.testing.assert_close(output.reshape(-1, 64), expected, rtol=1e-5, atol=1e-6)


def test_one_expert_top1_without_shared_is_exactly_the_dense_ffn():
    layer = moe_layer(num_experts=1, top_k=1, shared=0)
    dense = FeedForward(ModelConfig.from_name("tiny"))
    dense.load_state_dict(layer.experts[0].state_dict())
    x = torch.randn(3, 7, 64)
    assert torch.equal(layer(x)[0], dense(x))


def test_aux_loss_is_positive_and_trains_the_router_toward_balance():
    layer = moe_layer(num_experts=4, top_k=1)
    with torch.no_grad():
        layer.gate.weight[0] += 2.0 * layer.gate.weight.norm(dim=0)  # make expert 0 hog the tokens
    x = torch.randn(64, 64)
    optimizer = torch.optim.SGD(layer.gate.parameters(), lr=5.0)
    losses = []
    for _ in range(30):
        _, aux = layer(x)
        losses.append(aux.item())
        optimizer.zero_grad()
        aux.backward()
        optimizer.step()
    assert all(loss > 0 for loss in losses)
    assert losses[-1] < losses[0]


def test_gradients_reach_used_experts_only_and_idle_experts_get_zeros():
    """Idle experts still run (on no tokens), so their gradient is a zero, not None: DDP then needs no
    find_unused_parameters graph walk."""
    layer = moe_layer(num_experts=4, top_k=1)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[1, 0] = 10.0  # tokens with a positive first feature go to expert 1
        layer.gate.weight[2, 0] = -10.0  # the others to expert 2
    output, _ = layer(torch.randn(16, 64))
    output.sum().backward()
    for index, expert in enumerate(layer.experts):
        for param in expert.parameters():
            used = index in (1, 2)
            assert param.grad is not None and (param.grad.abs().sum() > 0) == used, f"expert {index}"


def test_moe_model_returns_its_aux_loss_and_dense_returns_zero():
    ids = torch.randint(3, 6400, (2, 8))
    assert random_model("tiny-moe")(ids).aux_loss > 0
    assert random_model("tiny")(ids).aux_loss == 0
    out = random_model("tiny-moe")(ids, labels=ids)
    assert out.loss > out.aux_loss > 0  # the loss includes the aux term
