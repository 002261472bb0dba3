"""minimind-3v as options of MiniMind-V: a SigLIP tower (any transformers vision folder), patch tokens pooled
to a set number, minimind-3v's LayerNorm + MLP projector, and its freezing rule; MiniMind-V stays the default."""

import json

import pytest
import torch
from conftest import random_model
from torch.nn import functional as F

from minimind.model.vision import MiniMindVLM, load_vision_tower, load_vlm, save_vlm

IMAGE_ID = 7


def siglip_folder(folder, full: bool = False, image_size: int = 32, patch_size: int = 8, seed: int = 0):
    """A tiny SigLIP vision tower saved as transformers saves it: vision-only, or a full image-text model."""
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=image_size,
                  patch_size=patch_size)
    if full:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**vision))
    model.save_pretrained(str(folder))
    SiglipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(str(folder))
    return folder


def picture(seed: int):
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (30, 40, 3), generator=generator, dtype=torch.uint8).numpy())


def test_a_siglip_tower_loads_from_a_vision_folder_or_the_vision_half_of_an_image_text_one(tmp_path):
    from transformers import SiglipModel

    tower, processor = load_vision_tower(siglip_folder(tmp_path / "vision"))
    half, _ = load_vision_tower(siglip_folder(tmp_path / "full", full=True))
    full = SiglipModel.from_pretrained(str(tmp_path / "full"))
    assert type(tower).__name__ == type(half).__name__ == "SiglipVisionModel"
    assert not any(p.requires_grad for p in half.parameters())
    assert all(torch.equal(value, full.vision_model.state_dict()[name.removeprefix("vision_model.")])
               for name, value in half.state_dict().items())
    assert processor(images=[picture(0)], return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)


def test_minimind3v_pools_the_patch_grid_and_projects_through_layernorm_and_a_two_layer_mlp(tmp_path):
    tower, processor = load_vision_tower(siglip_folder(tmp_path / "vision"))  # 32 px, 8 px patches: a 4 x 4 grid
    vlm = MiniMindVLM(random_model(vocab_size=64), tower, processor, IMAGE_ID, projector="mlp", image_tokens=4).eval()
    pixels = vlm.pixel_values([picture(0), picture(1)])
    with torch.no_grad():
        patches = tower(pixel_values=pixels).last_hidden_state  # SigLIP has no CLS token: 16 patches
        assert patches.shape[1] == 16
        pooled = patches.reshape(2, 2, 2, 2, 2, 32).mean(dim=(2, 4)).reshape(2, 4, 32)  # each 2 x 2 block of patches
        norm, first, _, second = vlm.projection
        expected = second(F.gelu(first(F.layer_norm(pooled, (32,), norm.weight, norm.bias, norm.eps))))
        assert torch.allclose(vlm.image_features(pixels), expected, atol=1e-5)

    save_vlm(vlm, tmp_path / "vlm", vision_model=None)
    stored = json.loads((tmp_path / "vlm" / "vision.json").read_text())
    assert (stored["projector"], stored["image_tokens"]) == ("mlp", 4)
    from minimind.model.tokenizer import train_tokenizer

    train_tokenizer(["看图"] * 10, vocab_size=280).save_pretrained(str(tmp_path / "vlm"))
    reloaded = load_vlm(tmp_path / "vlm")
    with torch.no_grad():
        assert torch.equal(reloaded.image_features(pixels), vlm.image_features(pixels))

    with pytest.raises(ValueError, match="pool to a square grid"):
        MiniMindVLM(random_model(vocab_size=64), tower, processor, IMAGE_ID, image_tokens=5)
    linear = MiniMindVLM(random_model(vocab_size=64), tower, processor, IMAGE_ID)  # MiniMind-V's default
    assert (linear.image_tokens, type(linear.projection).__name__, linear.projection.bias) == (16, "Linear", None)


def test_the_first_last_rule_trains_only_the_first_and_last_blocks_of_the_language_model(tmp_path):
    tower, processor = load_vision_tower(siglip_folder(tmp_path / "vision"))
    vlm = MiniMindVLM(random_model(vocab_size=64, num_hidden_layers=4), tower, processor, IMAGE_ID, projector="mlp")
    vlm.requires_grad_(False)
    vlm.projection.requires_grad_(True)
    vlm.train_language_model("first-last")
    trained = {name.split(".")[2] for name, p in vlm.language_model.named_parameters() if p.requires_grad}
    assert trained == {"0", "3"}  # model.layers.<i>.
    assert all(p.requires_grad for p in vlm.projection.parameters()) and not any(p.requires_grad for p in tower.parameters())
    vlm.train_language_model("all")
    assert all(p.requires_grad for p in vlm.language_model.parameters())
    with pytest.raises(ValueError, match="none, all or first-last"):
        vlm.train_language_model("last")


def test_an_image_token_count_the_patch_grid_cannot_pool_to_is_refused_before_training(mlflow_store, tmp_path):
    """The stage with minimind-3v's options trains in tests/test_train_jobs.py (VLM stages)."""
    from minimind.driver.runner import run_stage
    from minimind.model.checkpoint import save_model
    from minimind.model.tokenizer import train_tokenizer
    from minimind.training.configs import VLMConfig

    tokenizer = train_tokenizer(["看图"] * 10, vocab_size=280)
    save_model(random_model(vocab_size=len(tokenizer)), tmp_path / "llm", tokenizer=tokenizer)
    config = VLMConfig(init=str(tmp_path / "llm"), vision_model=str(siglip_folder(tmp_path / "siglip")), image_tokens=5)
    with pytest.raises(SystemExit, match="--image-tokens: 5 image tokens"):
        run_stage(config, "vlm_pretrain")
