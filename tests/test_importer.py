"""`minimind import`: MiniMind's own checkpoints, made here in both naming eras (dense and MoE, `.pth` in
half precision and as a MiniMind `transformers` folder) and as a Llama folder, import to model folders
whose logits equal the model they were made from."""

import json
import re

import pytest
import torch
from conftest import random_model
from safetensors.torch import save_file

from minimind.cli import main
from minimind.model.checkpoint import load_model
from minimind.model.hf import LEGACY_NAMES, export_hf, import_model

IDS = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))


def legacy_names(state: dict) -> dict:
    """MiniMind2 names -> the pre-2025-04 names, written out independently of the importer's table."""
    renames = [
        ("model.embed_tokens.", "tok_embeddings."),
        (".self_attn.q_proj.", ".attention.wq."),
        (".self_attn.k_proj.", ".attention.wk."),
        (".self_attn.v_proj.", ".attention.wv."),
        (".self_attn.o_proj.", ".attention.wo."),
        (".input_layernorm.", ".attention_norm."),
        (".post_attention_layernorm.", ".ffn_norm."),
        (".mlp.shared_experts.0.", ".feed_forward.shared_experts."),
        (".mlp.", ".feed_forward."),
        ("gate_proj.", "w1."),
        ("down_proj.", "w2."),
        ("up_proj.", "w3."),
        ("model.norm.", "norm."),
        ("lm_head.", "output."),
        ("model.layers.", "layers."),
    ]
    renamed = {}
    for key, tensor in state.items():
        for old, new in renames:
            key = key.replace(old, new)
        renamed[key] = tensor
    return renamed


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture
def tokenizer_dir(byte_tokenizer, tmp_path):
    byte_tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    return tmp_path / "tokenizer"


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("era", ["minimind2", "legacy"])
def test_a_half_precision_pth_of_either_era_imports_with_the_same_logits(tmp_path, tokenizer_dir, preset, era):
    model = random_model(preset, vocab_size=512, num_shared_experts=1 if preset == "tiny-moe" else 0)
    state = {key: tensor.half() for key, tensor in model.state_dict().items()}  # MiniMind saves half precision
    saved = legacy_names(state) if era == "legacy" else state
    assert ("layers.0.attention.wq.weight" in saved) == (era == "legacy")
    torch.save(saved, tmp_path / "full_sft_512.pth")
    folder = import_model(tmp_path / "full_sft_512.pth", tmp_path / "imported", tokenizer_dir, {"num_attention_heads": 4})
    imported = load_model(folder)
    assert imported.config.num_experts == model.config.num_experts and imported.config.num_key_value_heads == 2
    reference = random_model(preset, vocab_size=512, num_shared_experts=1 if preset == "tiny-moe" else 0)
    reference.load_state_dict({key: tensor.float() for key, tensor in state.items()})
    torch.testing.assert_close(logits(imported), logits(reference), rtol=0, atol=1e-5)


def test_a_minimind_transformers_folder_maps_its_config_moe_included(tmp_path, tokenizer_dir):
    model = random_model("tiny-moe", vocab_size=512, num_shared_experts=1, rope_theta=10000.0)
    folder = tmp_path / "MiniMind2-MoE"
    folder.mkdir()
    save_file(
        {k: v.clone() for k, v in model.state_dict().items()}, str(folder / "model.safetensors")
    )  # the head stored too, as MiniMind does
    for name in tokenizer_dir.iterdir():
        (folder / name.name).write_bytes(name.read_bytes())
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["MiniMindForCausalLM"],
                "model_type": "minimind",
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 512,
                "rope_theta": 10000.0,
                "rms_norm_eps": 1e-5,
                "max_position_embeddings": 2048,
                "flash_attn": True,
                "use_moe": True,
                "n_routed_experts": 4,
                "num_experts_per_tok": 2,
                "n_shared_experts": 1,
                "scoring_func": "softmax",
                "aux_loss_alpha": 0.01,
                "seq_aux": True,
                "norm_topk_prob": True,
                "intermediate_size": 192,
            }
        )
    )
    imported = load_model(import_model(folder, tmp_path / "imported"))  # the folder's own tokenizer
    assert (imported.config.num_experts, imported.config.num_shared_experts, imported.config.rope_theta) == (4, 1, 10000.0)
    torch.testing.assert_close(logits(imported), logits(model), rtol=0, atol=1e-5)

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "scoring_func": "sigmoid"}))
    with pytest.raises(ValueError, match="scoring_func='sigmoid'"):
        import_model(folder, tmp_path / "refused")


def test_a_llama_folder_imports_and_what_cannot_map_is_refused_by_name(tmp_path, tokenizer_dir):
    from minimind.model.checkpoint import save_model

    model = random_model("tiny", vocab_size=512)
    save_model(
        model, tmp_path / "ours", tokenizer=__import__("minimind.model.tokenizer", fromlist=["x"]).load_tokenizer(tokenizer_dir)
    )
    export_hf(tmp_path / "ours", tmp_path / "llama")
    imported = load_model(import_model(tmp_path / "llama", tmp_path / "imported"))
    torch.testing.assert_close(logits(imported), logits(model), rtol=0, atol=1e-5)

    state = dict(model.state_dict())
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)  # our linears have no bias
    torch.save(state, tmp_path / "biased.pth")
    with pytest.raises(ValueError, match=re.escape("model.layers.0.self_attn.q_proj.bias")):
        import_model(tmp_path / "biased.pth", tmp_path / "refused", tokenizer_dir)
    torch.save(model.state_dict(), tmp_path / "no_tokenizer.pth")
    with pytest.raises(ValueError, match="--tokenizer"):
        import_model(tmp_path / "no_tokenizer.pth", tmp_path / "refused")


def test_the_import_command_writes_a_folder_and_registers_it(mlflow_store, tmp_path, tokenizer_dir, capsys):
    from minimind import tracking

    model = random_model("tiny", vocab_size=512)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, tmp_path / "pretrain_512.pth")
    main(
        [
            "import",
            str(tmp_path / "pretrain_512.pth"),
            str(tmp_path / "imported"),
            "--tokenizer",
            str(tokenizer_dir),
            "--preset",
            "tiny",
            "--config-overrides",
            "vocab_size=512",
            "--register-as",
            "minimind-imported",
        ]
    )
    assert "registered models:/minimind-imported/1" in capsys.readouterr().out
    registered = load_model(tracking.resolve_model("models:/minimind-imported/1", tmp_path / "resolved"))
    torch.testing.assert_close(logits(registered), logits(load_model(tmp_path / "imported")), rtol=0, atol=0)


def test_the_legacy_table_renames_every_old_name():
    old = legacy_names({k: None for k in random_model("tiny-moe", num_shared_experts=1).state_dict()})
    for key in old:
        renamed = key
        for pattern, replacement in LEGACY_NAMES:
            renamed = re.sub(pattern, replacement, renamed)
        assert renamed.startswith(("model.", "lm_head.")), key


def chatml_tokenizer():
    """MiniMind2's later layout: <|endoftext|>, <|im_start|>, <|im_end|> and a ChatML template; no tag is a token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        ["小明喜欢红色。", "12 加 30 等于 42", "hello minimind"] * 20,
        trainers.BpeTrainer(
            vocab_size=420,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        chat_template=template,
    )


@pytest.mark.parametrize("template", ["seed", "chatml"])
def test_an_imported_model_with_minimind_tokenizer_trains_sft_and_reasoning_and_answers(
    ray_cluster, byte_tokenizer, tmp_path, template
):
    """Both of MiniMind's template eras, with no single-token tags and no image token: one import, a few
    SFT and reasoning steps (the Ray Train loop, in-process), then a chat reply from the serving engine."""
    import asyncio

    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from minimind.data.prepare import prepare
    from minimind.data.rows import StageData
    from minimind.demo import demo_data
    from minimind.driver.stages import STAGES
    from minimind.serve.engine import ChatModel
    from minimind.serve.protocol import ChatRequest
    from minimind.training.configs import DistillConfig, SFTConfig
    from minimind.training.loop import StageJob, train_loop_per_worker

    tokenizer = byte_tokenizer if template == "seed" else chatml_tokenizer()
    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    brought = random_model("tiny", vocab_size=len(tokenizer), std=0.02)
    with torch.no_grad():
        brought.model.embed_tokens.weight[:3] = 0  # its special tokens hardly win: the reply has tokens to show
    torch.save({k: v.half() for k, v in brought.state_dict().items()}, tmp_path / "sft.pth")
    folder = str(import_model(tmp_path / "sft.pth", tmp_path / "imported", tmp_path / "tokenizer", {"num_attention_heads": 4}))
    paths = demo_data()
    for stage, config in (
        ("sft", SFTConfig(max_steps=2, batch_size=4, seq_len=256)),
        ("reason", DistillConfig(max_steps=2, batch_size=2, seq_len=512)),
    ):
        source = tmp_path / f"{stage}.jsonl"
        with open(paths[stage], encoding="utf-8") as file:
            source.write_text("".join(next(file) for _ in range(40)), encoding="utf-8")
        prepared = prepare(str(source), tokenizer, StageData(stage, seq_len=config.seq_len), str(tmp_path / "prepared"))
        if stage == "reason":  # every tag is several tokens here, and they are weighted
            assert all(len(ids) > 1 for ids in prepared.manifest["tag_sequences"])
        config.cpus_per_worker, config.checkpoint_every = 1, 100
        job = StageJob(STAGES[stage], config, init_dir=folder, data_path=prepared.location)
        result = TorchTrainer(
            train_loop_per_worker, train_loop_config={"job": job}, scaling_config=ScalingConfig(num_workers=0)
        ).fit()
        assert result.metrics["step"] == 2 and 0 < result.metrics["train/loss"] < 20

    chat = ChatModel(folder, compile="off")  # the compiled default is test_cli's and test_serve's (CI time)
    assert chat.engine.stop_token_ids == [tokenizer.eos_token_id]

    async def reply():
        return [
            event
            async for event in chat.chat(ChatRequest("m", [{"role": "user", "content": "你好"}], temperature=0.0, max_tokens=5))
        ]

    events = asyncio.run(reply())
    assert events[0]["type"] == "start" and events[-1]["type"] == "end" and events[-1]["completion_tokens"] > 0
