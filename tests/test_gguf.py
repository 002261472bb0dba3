"""GGUF export: what the file holds (every test run), and that llama.cpp loads it and answers as our model does
(`-m llama_cpp`, run by `make test-export`, which installs llama-cpp-python: a build of llama.cpp)."""

from itertools import islice

import numpy as np
import pytest
import torch
from conftest import memorized_model, random_model

from minimind.inference.chat import chat_prompt_ids
from minimind.inference.generate import generate
from minimind.model.checkpoint import save_model
from minimind.model.gguf_export import export_gguf, interleave_rope_rows
from minimind.model.tokenizer import load_tokenizer

CHATS = [  # (messages, reply): ASCII, Chinese, digits and spaces, a system turn
    ([{"role": "user", "content": "你好，请介绍一下你自己。"}], "我是 MiniMind，一个小小的语言模型。"),
    ([{"role": "user", "content": "小明的猫叫什么名字？"}], "小明的猫叫 Tom，它 3 岁了。"),
    ([{"role": "system", "content": "只说英文。"}, {"role": "user", "content": "hello?"}], "hello world, it's 42."),
]
ARCHITECTURES = {"llama": {}, "qwen3": {"qk_norm": True}}  # MiniMind2 and minimind-3


@pytest.fixture(scope="module")
def demo_tokenizer():
    from minimind.demo import demo_tokenizer

    return load_tokenizer(demo_tokenizer(0))


def rope_rotate_half(x: np.ndarray, position: int, theta: float = 1e6) -> np.ndarray:
    """Our rotation of one head's vector: dimension i pairs with i + d/2."""
    half = x.shape[-1] // 2
    angles = position * theta ** (-np.arange(half) / half)
    first, second = x[:half], x[half:]
    return np.concatenate([first * np.cos(angles) - second * np.sin(angles), second * np.cos(angles) + first * np.sin(angles)])


def rope_adjacent_pairs(x: np.ndarray, position: int, theta: float = 1e6) -> np.ndarray:
    """llama.cpp's `llama` rotation: dimension 2i pairs with 2i + 1."""
    half = x.shape[-1] // 2
    angles = position * theta ** (-np.arange(half) / half)
    even, odd = x[0::2], x[1::2]
    out = np.empty_like(x)
    out[0::2], out[1::2] = even * np.cos(angles) - odd * np.sin(angles), odd * np.cos(angles) + even * np.sin(angles)
    return out


def test_reordered_rows_under_adjacent_pair_rope_give_our_attention_scores():
    torch.manual_seed(0)
    heads, head_dim, hidden = 2, 8, 16
    q_proj, k_proj = torch.randn(heads * head_dim, hidden), torch.randn(heads * head_dim, hidden)
    x_q, x_k = torch.randn(hidden), torch.randn(hidden)
    ours_q, ours_k = (q_proj @ x_q).numpy(), (k_proj @ x_k).numpy()
    theirs_q = (interleave_rope_rows(q_proj, heads) @ x_q).numpy()
    theirs_k = (interleave_rope_rows(k_proj, heads) @ x_k).numpy()
    for head in range(heads):
        rows = slice(head * head_dim, (head + 1) * head_dim)
        ours = rope_rotate_half(ours_q[rows], 5) @ rope_rotate_half(ours_k[rows], 2)
        theirs = rope_adjacent_pairs(theirs_q[rows], 5) @ rope_adjacent_pairs(theirs_k[rows], 2)
        assert theirs == pytest.approx(ours, rel=1e-5)
        assert not np.allclose(rope_adjacent_pairs(ours_q[rows], 5) @ rope_adjacent_pairs(ours_k[rows], 2), ours)


def test_the_file_holds_the_shape_tokenizer_and_weights(tmp_path, demo_tokenizer):
    import gguf

    model = random_model(vocab_size=len(demo_tokenizer), qk_norm=True)
    save_model(model, tmp_path / "model", tokenizer=demo_tokenizer)
    reader = gguf.GGUFReader(export_gguf(tmp_path / "model", tmp_path / "model.gguf", quant="f16"))

    def field(name):
        return reader.fields[name].contents()

    assert field("general.architecture") == "qwen3"
    config = model.config
    assert (field("qwen3.block_count"), field("qwen3.attention.head_count"), field("qwen3.attention.head_count_kv")) == (
        config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads)
    vocab = demo_tokenizer.get_vocab()
    assert field("tokenizer.ggml.tokens") == sorted(vocab, key=vocab.get)
    assert field("tokenizer.ggml.eos_token_id") == demo_tokenizer.eos_token_id
    assert field("tokenizer.chat_template") == demo_tokenizer.chat_template
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert "output.weight" not in tensors  # the head is tied: llama.cpp reads token_embd for it
    assert tensors["blk.1.attn_k_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    stored = np.asarray(tensors["blk.1.ffn_down.weight"].data)
    assert stored.dtype == np.float16
    np.testing.assert_array_equal(stored, model.model.layers[1].mlp.down_proj.weight.detach().numpy().astype(np.float16))


def test_export_refuses_what_llama_cpp_has_no_architecture_for(tmp_path, demo_tokenizer):
    save_model(random_model("tiny-moe", vocab_size=len(demo_tokenizer)), tmp_path / "moe", tokenizer=demo_tokenizer)
    with pytest.raises(ValueError, match="shared experts"):
        export_gguf(tmp_path / "moe", tmp_path / "moe.gguf")
    with pytest.raises(ValueError, match="unknown quantisation 'q4_k'"):
        export_gguf(tmp_path / "moe", tmp_path / "moe.gguf", quant="q4_k")
    assert not (tmp_path / "moe.gguf").exists()


def llama_cpp_model(path, **options):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False, **options)


@pytest.mark.llama_cpp
@pytest.mark.parametrize("architecture", ["llama", "qwen3", "qwen3moe"])
def test_llama_cpp_computes_our_logits(tmp_path, demo_tokenizer, architecture):
    """A random model (no memorised answer to lean on): every position's logits within f16's rounding."""
    shape = {"qwen3moe": {"qk_norm": True, "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True}}
    model = random_model(vocab_size=len(demo_tokenizer), **ARCHITECTURES.get(architecture, shape.get(architecture)))
    save_model(model, tmp_path / "model", tokenizer=demo_tokenizer)
    ids = demo_tokenizer.encode("hello world 123, 你好 世界！ it's 42.", add_special_tokens=False)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp_model(export_gguf(tmp_path / "model", tmp_path / "model.gguf", quant="f16"), logits_all=True)
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)])
    assert np.abs(theirs - ours).max() < 0.05, np.abs(theirs - ours).max(axis=1)


@pytest.mark.llama_cpp
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_llama_cpp_answers_as_our_model_does(tmp_path, demo_tokenizer, architecture):
    """Both tokenize the chats alike, and greedy decoding gives our tokens: all of them in f16, the first 8 in
    q8_0. llama.cpp's own chat completion (the GGUF's template, its tokenizer) writes our reply."""
    model = memorized_model(demo_tokenizer, *CHATS[0], also=[(messages, reply, None) for messages, reply in CHATS[1:]],
                            **ARCHITECTURES[architecture])
    save_model(model, tmp_path / "model", tokenizer=demo_tokenizer)
    prompts = [chat_prompt_ids(demo_tokenizer, messages) for messages, _ in CHATS]
    ours = generate(model, prompts, max_new_tokens=24)
    for quant, compared in (("f16", None), ("q8_0", 8)):
        llm = llama_cpp_model(export_gguf(tmp_path / "model", tmp_path / f"model-{quant}.gguf", quant=quant))
        for (messages, reply), prompt, our_tokens in zip(CHATS, prompts, ours):
            text = demo_tokenizer.decode(prompt)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt
            theirs = list(islice(llm.generate(prompt, temp=0.0, reset=True), len(our_tokens)))
            assert theirs[:compared] == our_tokens[:compared], (quant, reply)
            if quant == "f16":
                completion = llm.create_chat_completion(messages, max_tokens=24, temperature=0.0)["choices"][0]
                assert (completion["message"]["content"], completion["finish_reason"]) == (reply, "stop")
        llm.close()


def test_minimind_export_writes_q8_0_for_a_gguf_destination(tmp_path, demo_tokenizer, capsys):
    import gguf

    from minimind.cli import main

    save_model(random_model(vocab_size=len(demo_tokenizer)), tmp_path / "model", tokenizer=demo_tokenizer)
    main(["export", str(tmp_path / "model"), str(tmp_path / "model.gguf"), "--quant", "q8_0"])
    assert "llama-cli -m" in capsys.readouterr().out
    types = {tensor.name: tensor.tensor_type for tensor in gguf.GGUFReader(tmp_path / "model.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    with pytest.raises(SystemExit, match="minimind export: .*nowhere is neither a directory nor a models:/"):
        main(["export", str(tmp_path / "nowhere"), str(tmp_path / "other.gguf")])
