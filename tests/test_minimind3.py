"""minimind-3's architecture (QK-norm, a head size of its own, Qwen3-MoE's routing) against an implementation
that is not ours: transformers' Qwen3 and Qwen3-MoE, with our weights copied in. MiniMind2 stays as it was."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from minimind.inference.generate import generate
from minimind.model.checkpoint import load_model, save_model
from minimind.model.config import PRESETS, ModelConfig
from minimind.model.hf import export_hf, import_model, qwen3_state
from minimind.model.model import MiniMindForCausalLM, MoEFeedForward


def tiny3(**overrides) -> ModelConfig:
    """A tiny minimind-3: 4 query heads of 32 (so heads x head size is not the hidden size), 2 KV heads."""
    return ModelConfig(**{"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "num_key_value_heads": 2, "attention_head_dim": 32, "qk_norm": True, "intermediate_size": 96,
                          "rms_norm_eps": 1e-6, "max_position_embeddings": 256, **overrides})


def qwen3(config: ModelConfig):
    """transformers' Qwen3 (or Qwen3-MoE) of the same shape, holding our model's weights."""
    shape = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
                 num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                 head_dim=config.head_dim, intermediate_size=config.intermediate_size, rms_norm_eps=config.rms_norm_eps,
                 max_position_embeddings=config.max_position_embeddings, rope_parameters={"rope_type": "default",
                 "rope_theta": config.rope_theta}, tie_word_embeddings=True, attention_bias=False)
    if config.is_moe:
        routing = dict(num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
                       norm_topk_prob=bool(config.norm_topk_prob))
        theirs = Qwen3MoeForCausalLM(Qwen3MoeConfig(**shape, moe_intermediate_size=config.intermediate_size, **routing))
    else:
        theirs = Qwen3ForCausalLM(Qwen3Config(**shape))
    return theirs.eval()


def copy_weights(ours: MiniMindForCausalLM, theirs) -> None:
    state = dict(ours.state_dict())
    for layer in range(ours.config.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp."
        if ours.config.is_moe:  # transformers keeps the experts fused: gate and up stacked, then down
            expert = [f"{prefix}experts.{e}." for e in range(ours.config.num_experts)]
            state[prefix + "experts.gate_up_proj"] = torch.stack(
                [torch.cat([state.pop(e + "gate_proj.weight"), state.pop(e + "up_proj.weight")]) for e in expert])
            state[prefix + "experts.down_proj"] = torch.stack([state.pop(e + "down_proj.weight") for e in expert])
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)


@pytest.mark.parametrize("config", [
    tiny3(),
    tiny3(num_experts=4, num_experts_per_tok=1, norm_topk_prob=True),  # minimind-3-moe's routing
    tiny3(num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
], ids=["dense", "moe-top1", "moe-top2"])
def test_minimind3_logits_equal_transformers_qwen3(config):
    torch.manual_seed(0)
    ours = MiniMindForCausalLM(config).eval()
    for name, parameter in ours.named_parameters():  # norms away from 1, so QK-norm's weights count
        if name.endswith("norm.weight"):
            parameter.data.uniform_(0.5, 1.5)
    theirs = qwen3(config)
    copy_weights(ours, theirs)
    ids = torch.randint(3, config.vocab_size, (2, 24))
    with torch.no_grad():
        expected = theirs(ids).logits
        got = ours(ids).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_presets_have_minimind3s_shapes():
    dense, moe = PRESETS["minimind-3"], PRESETS["minimind-3-moe"]
    assert (dense.hidden_size, dense.num_hidden_layers, dense.num_attention_heads, dense.num_key_value_heads) == (768, 8, 8, 4)
    assert dense.intermediate_size == 2432 and dense.qk_norm and dense.rms_norm_eps == 1e-6 and dense.vocab_size == 6400
    assert round(MiniMindForCausalLM(dense).num_parameters() / 1e6) == 64
    model = MiniMindForCausalLM(moe)
    assert (moe.num_experts, moe.num_experts_per_tok, moe.num_shared_experts, moe.norm_topk_prob) == (4, 1, 0, True)
    assert round(model.num_parameters() / 1e6) == 198 and round(model.num_parameters(active=True) / 1e6) == 64


def test_minimind2_keeps_its_layout_and_its_top1_router_weights():
    """No QK-norm weights, the head size from hidden / heads, and a top-1 expert weighted by its router
    probability (MiniMind2's rule: only top-k > 1 is renormalised), as a config.json of before says."""
    for name in ("minimind2-small", "minimind2", "minimind2-moe"):
        config = PRESETS[name]
        assert not config.qk_norm and config.head_dim == config.hidden_size // config.num_attention_heads
        assert not any("q_norm" in key or "k_norm" in key for key in MiniMindForCausalLM(config).state_dict())
    saved_before = {key: value for key, value in PRESETS["tiny-moe"].to_dict().items()
                    if key not in ("attention_head_dim", "qk_norm", "norm_topk_prob")}
    config = ModelConfig.from_dict({**saved_before, "num_experts_per_tok": 1, "num_shared_experts": 0})
    torch.manual_seed(0)
    moe = MoEFeedForward(config)
    tokens = torch.randn(5, config.hidden_size)
    probs = moe.gate(tokens).softmax(dim=-1)
    expert = probs.argmax(dim=-1)
    expected = torch.stack([probs[i, e] * moe.experts[e](tokens[i]) for i, e in enumerate(expert.tolist())])
    torch.testing.assert_close(moe(tokens[None])[0][0], expected)


MOE = {"num_experts": 4, "num_experts_per_tok": 1, "norm_topk_prob": True}  # minimind-3-moe's routing


@pytest.mark.parametrize("config", [tiny3(), tiny3(**MOE)], ids=["dense", "moe"])
def test_minimind3_exports_as_a_qwen3_folder_that_transformers_loads_and_decodes_as_we_do(tmp_path, config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ours = MiniMindForCausalLM(config).eval()
    save_model(ours, tmp_path / "ours")
    theirs = AutoModelForCausalLM.from_pretrained(export_hf(tmp_path / "ours", tmp_path / "hf")).eval()
    assert type(theirs) is (Qwen3MoeForCausalLM if config.is_moe else Qwen3ForCausalLM)
    ids = torch.randint(3, config.vocab_size, (2, 40))
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids).logits).abs().max() <= 1e-4
        prompt = [5, 17, 99, 100, 7]
        greedy = theirs.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert greedy[0, len(prompt):].tolist() == generate(ours, [prompt], max_new_tokens=8, stop_token_ids=[])[0]


def reference_qwen3(config: ModelConfig):
    """A random transformers Qwen3 (Qwen3-MoE) of `config`'s shape, its weights rounded to half precision
    as MiniMind's trainers save them, and its state dict under MiniMind's names (experts one by one)."""
    torch.manual_seed(1)
    theirs = qwen3(config)
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.2 if parameter.dim() > 1 else 1 + 0.3 * torch.randn_like(parameter))
            parameter.copy_(parameter.half().float())
    state = {key: tensor.half() for key, tensor in theirs.state_dict().items() if key != "lm_head.weight"}
    for layer in range(config.num_hidden_layers if config.is_moe else 0):
        prefix = f"model.layers.{layer}.mlp.experts."
        gate_up, down = state.pop(prefix + "gate_up_proj"), state.pop(prefix + "down_proj")
        for e in range(config.num_experts):
            gate, up = gate_up[e].chunk(2)
            names = (f"{prefix}{e}.{name}_proj.weight" for name in ("gate", "up", "down"))
            state |= dict(zip(names, (gate, up, down[e])))
    return theirs, state


@pytest.mark.parametrize("config", [tiny3(vocab_size=512), tiny3(vocab_size=512, **MOE)], ids=["dense", "moe"])
def test_a_minimind3_pth_imports_with_the_logits_of_the_reference(tmp_path, byte_tokenizer, config, capsys):
    """The head size comes from the QK-norm weights (32 here, not hidden / heads = 16), so nothing is assumed
    about heads; an MoE's top-k the weights cannot tell, and the import says what it took (minimind-3-moe's 1)."""
    byte_tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    theirs, state = reference_qwen3(config)
    torch.save(state, tmp_path / "full_sft_768.pth")
    imported = load_model(import_model(tmp_path / "full_sft_768.pth", tmp_path / "imported", tmp_path / "tokenizer"))
    assert (imported.config.num_attention_heads, imported.config.head_dim, imported.config.qk_norm) == (4, 32, True)
    said = capsys.readouterr().out
    assert "query heads" not in said and ("assuming each token goes to its top 1 experts" in said) == config.is_moe
    ids = torch.randint(3, config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(imported(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_minimind3_transformers_folder_imports_with_its_head_size(tmp_path, byte_tokenizer):
    config = tiny3(vocab_size=512, **MOE)
    theirs, state = reference_qwen3(config)
    folder = tmp_path / "minimind-3-moe"
    byte_tokenizer.save_pretrained(str(folder))
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(folder / "model.safetensors"))
    fields = {"model_type": "minimind", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 32,
              "num_key_value_heads": 2, "vocab_size": 512, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "intermediate_size": 96,
              "max_position_embeddings": 256, "use_moe": True, "n_routed_experts": 4, "num_experts_per_tok": 1,
              "n_shared_experts": 0, "norm_topk_prob": True, "scoring_func": "softmax"}
    (folder / "config.json").write_text(json.dumps(fields))
    imported = load_model(import_model(folder, tmp_path / "imported"))
    assert (imported.config.head_dim, imported.config.num_experts, imported.config.norm_topk_prob) == (32, 4, True)
    ids = torch.randint(3, 512, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(imported(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_pth_without_qk_norm_says_what_it_assumes_about_heads(tmp_path, byte_tokenizer, capsys):
    """A MiniMind2 .pth cannot tell 4 heads of 16 from 8 of 8: the import says what it assumed and how to
    change it, and with the override the logits are the model's."""
    byte_tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    torch.manual_seed(0)
    model = MiniMindForCausalLM(ModelConfig(**{**PRESETS["tiny"].to_dict(), "vocab_size": 512})).eval()  # 4 heads of 16
    torch.save(model.state_dict(), tmp_path / "four_heads.pth")
    assumed = load_model(import_model(tmp_path / "four_heads.pth", tmp_path / "assumed", tmp_path / "tokenizer"))
    said = capsys.readouterr().out
    assert "assuming 8 query heads of size 8" in said and "--config-overrides num_attention_heads=N" in said
    told = load_model(
        import_model(tmp_path / "four_heads.pth", tmp_path / "told", tmp_path / "tokenizer", {"num_attention_heads": 4}))
    assert "assuming" not in capsys.readouterr().out
    ids = torch.randint(3, 512, (2, 12))
    with torch.no_grad():
        assert not torch.allclose(assumed(ids).logits, model(ids).logits, atol=1e-3)
        torch.testing.assert_close(told(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("config", [tiny3(vocab_size=320), tiny3(vocab_size=320, **MOE)], ids=["dense", "moe"])
def test_a_qwen3_folder_imports_back_with_its_minimind3_tokenizer(tmp_path, config):
    """What export_hf (or MiniMind's own export) writes comes back through `minimind import`: Qwen3-MoE's fused
    experts unfused, the routing and head size from its config.json, minimind-3's tokenizer and markers."""
    from minimind.model.tokenizer import MINIMIND3_MARKERS, Markers, load_tokenizer, train_tokenizer

    tokenizer = train_tokenizer(["从前有座山，山里有座庙。", "hello minimind"] * 20, vocab_size=300, style="minimind-3")
    torch.manual_seed(0)
    ours = MiniMindForCausalLM(config).eval()
    save_model(ours, tmp_path / "ours", tokenizer=tokenizer)
    folder = export_hf(tmp_path / "ours", tmp_path / "hf")
    fused = tmp_path / "fused"  # the experts as transformers holds them in memory (its files list them one by one)
    shutil.copytree(folder, fused)
    save_file({k: v.clone() for k, v in qwen3_state(ours).items() if k != "lm_head.weight"}, str(fused / "model.safetensors"))
    ids = torch.randint(3, 300, (2, 24))
    for source in (folder, fused):
        back = import_model(source, tmp_path / f"back-{source.name}")
        imported = load_model(back).eval()
        assert imported.config.head_dim == 32 and imported.config.qk_norm
        routing = (imported.config.num_experts, imported.config.num_experts_per_tok)
        assert routing == (config.num_experts, config.num_experts_per_tok)
        with torch.no_grad():
            torch.testing.assert_close(imported(ids).logits, ours(ids).logits, rtol=0, atol=1e-6)
    reloaded = load_tokenizer(back)
    assert Markers.of(reloaded) == MINIMIND3_MARKERS
    assert (reloaded.bos_token, reloaded.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (imported.config.bos_token_id, imported.config.eos_token_id, imported.config.pad_token_id) == (1, 2, 0)
