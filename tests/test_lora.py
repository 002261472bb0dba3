"""LoRA in plain PyTorch: only the adapters train, the base stays bit for bit, merging changes nothing."""

import copy

import pytest
import torch
from conftest import random_model

from minimind.model.checkpoint import load_model, save_model
from minimind.model.lora import (
    LoRAConfig,
    LoRALinear,
    adapter_state,
    add_lora,
    is_adapter_dir,
    load_adapter,
    merge_adapter_dir,
    merge_lora,
    parse_targets,
    save_adapter,
    trainable_count,
)

IDS = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))


def train_adapters(model, steps: int = 5):
    """Train an adapted model a few AdamW steps (with weight decay) on next-token loss."""
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    losses = []
    for _ in range(steps):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses


def test_only_the_adapters_train_and_the_base_weights_stay_bit_identical():
    model = random_model()
    base = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    before = model(IDS).logits
    config = LoRAConfig(rank=4, alpha=8.0)
    add_lora(model, config)
    assert torch.equal(model(IDS).logits, before)  # B starts at zero: the adapted model is its base
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in name or ".lora_B" in name for name in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable_count(random_model(), config)

    model, losses = train_adapters(model)
    assert losses[-1] < losses[0]
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in base.items())  # weight decay never touched them
    assert not torch.equal(model(IDS).logits, before)


def test_the_merged_model_gives_the_adapter_models_logits(tmp_path, byte_tokenizer):
    config = LoRAConfig(rank=4, alpha=16.0, base="models:/minimind-sft/3")
    model, _ = train_adapters(add_lora(random_model(std=0.1), config))  # logits up to about 5
    adapted = model(IDS).logits

    save_adapter(model, tmp_path / "adapter", config, tokenizer=byte_tokenizer)
    assert is_adapter_dir(tmp_path / "adapter")
    assert LoRAConfig.load(tmp_path / "adapter" / "adapter_config.json").base == "models:/minimind-sft/3"
    assert set(adapter_state(model)) == {name for name in model.state_dict() if ".lora_" in name}  # the adapters alone

    merged = merge_lora(copy.deepcopy(model))
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert (merged(IDS).logits - adapted).abs().max() <= 1e-5

    save_model(random_model(std=0.1), tmp_path / "base")  # the same base weights (same seed)
    folder = merge_adapter_dir(tmp_path / "adapter", tmp_path / "base", tmp_path / "merged")
    assert (load_model(folder)(IDS).logits - adapted).abs().max() <= 1e-5
    assert (folder / "tokenizer.json").is_file()
    reloaded = load_adapter(load_model(tmp_path / "base"), tmp_path / "adapter")
    assert torch.equal(reloaded(IDS).logits, adapted)


def test_targets_choose_which_projections_get_adapters():
    assert parse_targets("attention") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert parse_targets("q_proj, v_proj,ffn") == ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    with pytest.raises(ValueError, match="unknown LoRA target 'lm_head'"):
        parse_targets("lm_head")
    model = add_lora(random_model(), LoRAConfig(rank=2, targets=parse_targets("q_proj,v_proj")))
    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, LoRALinear)}
    assert adapted == {"q_proj", "v_proj"}
    moe = add_lora(random_model("tiny-moe"), LoRAConfig(rank=2, targets=parse_targets("ffn")))
    assert any(".experts." in name for name, module in moe.named_modules() if isinstance(module, LoRALinear))


def test_adapters_that_do_not_fit_the_model_are_refused(tmp_path):
    model = add_lora(random_model(), LoRAConfig(rank=2, targets=["q_proj"]))
    save_adapter(model, tmp_path, LoRAConfig(rank=2, targets=["q_proj"]))
    other = add_lora(random_model(), LoRAConfig(rank=2, targets=["v_proj"]))
    with pytest.raises(ValueError, match="does not fit the model"):
        load_adapter(other, tmp_path)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        add_lora(model, LoRAConfig(rank=2, targets=["q_proj"]))


def test_minimind_merge_lora_writes_the_merged_model_folder(tmp_path, byte_tokenizer, monkeypatch):
    import tempfile

    from minimind.cli import main

    scratch = tmp_path / "tmp"  # where its temporary folders go: none of its own stays (torch may put its caches there)
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    save_model(random_model(std=0.1), tmp_path / "base", tokenizer=byte_tokenizer)
    config = LoRAConfig(rank=4, base=str(tmp_path / "base"))
    model, _ = train_adapters(add_lora(random_model(std=0.1), config))
    save_adapter(model, tmp_path / "adapter", config, tokenizer=byte_tokenizer)

    main(["merge-lora", str(tmp_path / "adapter"), str(tmp_path / "merged")])  # the base named in adapter_config.json
    assert (load_model(tmp_path / "merged")(IDS).logits - model(IDS).logits).abs().max() <= 1e-5
    save_model(random_model(std=0.1, seed=1), tmp_path / "other")
    main(["merge-lora", str(tmp_path / "adapter"), str(tmp_path / "merged-other"), "--base", str(tmp_path / "other")])
    assert not torch.equal(load_model(tmp_path / "merged-other").lm_head.weight, load_model(tmp_path / "merged").lm_head.weight)
    with pytest.raises(SystemExit, match="holds no LoRA adapters"):
        main(["merge-lora", str(tmp_path / "base"), str(tmp_path / "nothing")])
    assert list(scratch.glob("minimind-*")) == []
