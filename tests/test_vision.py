"""MiniMind-V's model: CLIP tower + bias-free projection + placeholder splice, images through Pillow."""

import io
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import random_model
from PIL import Image

from minimind.data.images import ImageError, load_image
from minimind.inference.chat import Chat, prompt_ids
from minimind.inference.generate import generate
from minimind.model.checkpoint import save_model
from minimind.model.vision import MiniMindVLM, is_vlm_dir, load_vision_tower, load_vlm, save_vlm

IMAGE_ID = 7  # <image> among the special tokens of minimind.model.tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    from minimind.model.tokenizer import Markers, train_tokenizer

    tokenizer = train_tokenizer(["图中有一个红色的圆形。", "hello world"] * 20, vocab_size=300)
    assert Markers.of(tokenizer).ids(tokenizer)["image"] == IMAGE_ID
    return tokenizer


def clip_tower(hidden=32, image_size=32, patch_size=16, layers=1, heads=2, seed=0):
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    processor = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return CLIPVisionModel(config).eval().requires_grad_(False), processor


def tiny_vlm(**tower):
    vlm = MiniMindVLM(random_model(vocab_size=64), *clip_tower(**tower), image_token_id=IMAGE_ID)
    torch.nn.init.normal_(vlm.projection.weight, std=0.5)
    return vlm.eval()


def picture(seed: int, size=(40, 30)) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def test_vit_b16_shape_gives_196_tokens_of_width_768_projected_to_hidden():
    vlm = MiniMindVLM(
        random_model(vocab_size=64), *clip_tower(hidden=768, image_size=224, patch_size=16, heads=12), image_token_id=IMAGE_ID
    )
    assert vlm.image_tokens == 196
    assert vlm.projection.weight.shape == (vlm.config.hidden_size, 768) and vlm.projection.bias is None
    pixels = vlm.pixel_values([picture(0), picture(1, size=(300, 200))])
    assert pixels.shape == (2, 3, 224, 224)
    assert vlm.image_features(pixels).shape == (2, 196, vlm.config.hidden_size)


def test_image_features_land_exactly_on_the_placeholders_with_several_images_and_text_only_rows():
    vlm = tiny_vlm()  # 32-px images, 16-px patches: 4 tokens per image
    n = vlm.image_tokens
    rows = [
        [1, 9] + [IMAGE_ID] * n + [10] + [IMAGE_ID] * n + [11],  # two images
        [1, 9, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21],  # text only
        [1] + [IMAGE_ID] * n + [22, 23, 24, 25, 26, 27, 28],  # one image
    ]
    ids = torch.tensor(rows)
    pixels = vlm.pixel_values([picture(0), picture(1), picture(2)])
    embedded = vlm.embed(ids, pixels)
    features = vlm.image_features(pixels)
    text = vlm.language_model.model.embed_tokens(ids)
    placeholder = ids == IMAGE_ID
    assert torch.equal(embedded[~placeholder], text[~placeholder])
    assert torch.equal(embedded[0, 2 : 2 + n], features[0]) and torch.equal(embedded[0, 3 + n : 3 + 2 * n], features[1])
    assert torch.equal(embedded[2, 1 : 1 + n], features[2])
    with pytest.raises(ValueError, match="image placeholder tokens for 2 image"):
        vlm.embed(ids, pixels[:2])
    assert torch.equal(vlm.embed(ids[1:2], None), text[1:2])  # text-only batches need no pixels


def test_the_language_model_sees_the_image():
    vlm = tiny_vlm()
    ids = torch.tensor([[1, 9] + [IMAGE_ID] * vlm.image_tokens + [10, 11]])
    first = vlm(ids, pixel_values=vlm.pixel_values([picture(0)])).logits
    second = vlm(ids, pixel_values=vlm.pixel_values([picture(1)])).logits
    assert not torch.allclose(first[0, -1], second[0, -1])
    assert torch.allclose(first[0, :2], second[0, :2])  # causal: positions before the image cannot see it


def test_generation_with_images_matches_without_cache_and_one_by_one():
    vlm = tiny_vlm()
    n = vlm.image_tokens
    prompts = [[1, 9] + [IMAGE_ID] * n + [10], [1, 3, 4, 5] + [IMAGE_ID] * n + [12, 13, 14] + [IMAGE_ID] * n + [15]]
    images = [picture(0), picture(1), picture(2)]
    chat = Chat(vlm, SimpleNamespace(eos_token_id=None))  # the loader's sampling: stop at the model's EOS, no placeholder

    def generate_with_images(prompts, images, **settings):
        return generate(vlm, prompts, chat.sampling(max_new_tokens=8, **settings), {"pixel_values": chat.pixel_values(images)})

    batched = generate_with_images(prompts, images)
    uncached = generate_with_images(prompts, images, use_cache=False)
    alone = generate_with_images(prompts[:1], images[:1]) + generate_with_images(prompts[1:], images[1:])
    assert batched == uncached == alone and all(len(tokens) == 8 for tokens in batched)
    assert all(IMAGE_ID not in tokens for tokens in batched)  # the placeholder is never generated


def test_a_saved_vlm_is_self_contained_and_loads_after_moving(tmp_path, tokenizer):
    vlm = MiniMindVLM(random_model(vocab_size=len(tokenizer)), *clip_tower(), image_token_id=IMAGE_ID)
    save_vlm(vlm, tmp_path / "a", tokenizer)
    shutil.move(tmp_path / "a", tmp_path / "b")
    loaded = load_vlm(tmp_path / "b")
    ids = torch.tensor([[1, 9] + [IMAGE_ID] * vlm.image_tokens + [10]])
    pixels = vlm.pixel_values([picture(3)])
    assert is_vlm_dir(tmp_path / "b") and (tmp_path / "b" / "vision" / "config.json").is_file()
    assert torch.equal(vlm(ids, pixel_values=pixels).logits, loaded(ids, pixel_values=pixels).logits)


def test_a_linked_vision_tower_is_referenced_not_copied(tmp_path, tokenizer):
    tower, processor = clip_tower()
    tower.save_pretrained(str(tmp_path / "clip"))
    processor.save_pretrained(str(tmp_path / "clip"))
    loaded_tower, loaded_processor = load_vision_tower(tmp_path / "clip")
    vlm = MiniMindVLM(random_model(vocab_size=len(tokenizer)), loaded_tower, loaded_processor, image_token_id=IMAGE_ID)
    save_vlm(vlm, tmp_path / "vlm", tokenizer, vision_model=tmp_path / "clip")
    assert not (tmp_path / "vlm" / "vision").exists()
    reloaded = load_vlm(tmp_path / "vlm").vision_tower.state_dict()
    assert all(torch.equal(reloaded[name], value) for name, value in tower.state_dict().items())


def test_checkpoints_reference_the_tower_and_the_final_model_holds_one_copy(tmp_path, tokenizer):
    from minimind.driver.stages import STAGES
    from minimind.model.vision import VISION_CONFIG_NAME, VisionConfig, copy_vision_tower

    vlm = MiniMindVLM(random_model(vocab_size=len(tokenizer)), *clip_tower(), image_token_id=IMAGE_ID)
    save_vlm(vlm, tmp_path / "init", tokenizer)  # self-contained, as a registered version is
    stage = STAGES["vlm_sft"]
    training = stage.load(tmp_path / "init", "cpu")
    stage.save(training, tmp_path / "checkpoint", tokenizer)
    assert not (tmp_path / "checkpoint" / "vision").exists()
    assert VisionConfig.load(tmp_path / "checkpoint" / VISION_CONFIG_NAME).vision_model == str(
        (tmp_path / "init" / "vision").resolve()
    )
    resumed = stage.load(tmp_path / "checkpoint", "cpu")  # a checkpoint of a checkpoint still points at the one tower
    stage.save(resumed, tmp_path / "checkpoint2", tokenizer)
    assert VisionConfig.load(tmp_path / "checkpoint2" / VISION_CONFIG_NAME).vision_model == str(
        (tmp_path / "init" / "vision").resolve()
    )

    copy_vision_tower(tmp_path / "checkpoint2")  # what the job does once, to the model it registers
    shutil.rmtree(tmp_path / "init")
    final = load_vlm(tmp_path / "checkpoint2")
    assert VisionConfig.load(tmp_path / "checkpoint2" / VISION_CONFIG_NAME).vision_model == "vision"
    assert all(torch.equal(final.vision_tower.state_dict()[k], v) for k, v in vlm.vision_tower.state_dict().items())


def test_a_text_only_batch_still_gives_the_projection_a_gradient(tokenizer):
    """DDP (find_unused_parameters=False) needs every trained parameter in every step's graph."""
    vlm = MiniMindVLM(random_model(vocab_size=len(tokenizer)), *clip_tower(), image_token_id=IMAGE_ID).train()
    ids = torch.tensor([[1, 9, 10, 11]])
    vlm(ids, labels=ids).loss.backward()
    assert vlm.projection.weight.grad is not None and not vlm.projection.weight.grad.any()


def test_the_language_model_of_a_vlm_directory_still_loads_alone(tmp_path, tokenizer):
    from minimind.model.checkpoint import load_model

    vlm = MiniMindVLM(random_model(vocab_size=len(tokenizer)), *clip_tower(), image_token_id=IMAGE_ID)
    save_vlm(vlm, tmp_path / "vlm", tokenizer)
    save_model(vlm.language_model, tmp_path / "llm")
    assert torch.equal(load_model(tmp_path / "vlm").lm_head.weight, vlm.language_model.lm_head.weight)
    assert not is_vlm_dir(tmp_path / "llm")


# --------------------------------------------------------------------------- images through Pillow


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "1", "I;16", "LA"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    path = tmp_path / f"image.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    picture(0).convert(mode).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (40, 30)


def test_exif_orientation_is_honoured(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    picture(0, size=(40, 30)).save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (30, 40)


def test_decompression_bombs_and_oversized_images_are_refused(tmp_path):
    Image.new("L", (3000, 3000)).save(tmp_path / "big.png")  # 9 Mpx in a few kB
    with pytest.raises(ImageError, match="big.png: image too large"):
        load_image(tmp_path / "big.png", max_pixels=1_000_000)
    assert load_image(tmp_path / "big.png").size == (3000, 3000)  # within the default limit


def test_unreadable_and_missing_files_name_the_file(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageError, match="notes.png: not a readable image"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(ImageError, match="gone.png: no such image file"):
        load_image(tmp_path / "gone.png")
    truncated = io.BytesIO()
    picture(0).save(truncated, format="PNG")
    with pytest.raises(ImageError, match="upload: not a readable image"):
        load_image(io.BytesIO(truncated.getvalue()[:60]), name="upload")
    from test_protocol import with_garbage_exif

    with pytest.raises(ImageError, match="upload: not a readable image"):  # struct.error inside Pillow's EXIF reader
        load_image(io.BytesIO(with_garbage_exif()), name="upload")


def test_a_registered_vlm_answers_about_an_image_through_mlflow_pyfunc(tmp_path, tokenizer, mlflow_store):
    """The VLM versions' pyfunc model takes the image too (base64), one per <image> marker."""
    import base64

    import mlflow

    from minimind import tracking
    from minimind.inference.generate import generate

    vlm = MiniMindVLM(random_model(vocab_size=len(tokenizer)), *clip_tower(), image_token_id=IMAGE_ID)
    torch.nn.init.normal_(vlm.projection.weight, std=0.5)
    save_vlm(vlm, tmp_path / "vlm", tokenizer)
    tracking.configure("unit-vlm")
    with mlflow.start_run():
        version = tracking.register_model_dir(tmp_path / "vlm", "minimind-vlm-chat")
    buffer = io.BytesIO()
    picture(5).save(buffer, format="PNG")
    chat = {
        "messages": [{"role": "user", "content": "<image>\n图中有什么？"}],
        "images": [base64.b64encode(buffer.getvalue()).decode()],
    }
    model = mlflow.pyfunc.load_model(f"models:/minimind-vlm-chat/{version.version}")
    assert "images" in model.metadata.get_input_schema().input_names()
    replies = model.predict([chat, {**chat, "images": [base64.b64encode(buffer.getvalue()).decode()]}], params={"max_tokens": 5})
    reference = load_vlm(tmp_path / "vlm", dtype=torch.bfloat16)
    prompt = prompt_ids(reference, tokenizer, chat["messages"])
    expected = generate(
        reference,
        [prompt],
        prompt_inputs={"pixel_values": reference.pixel_values([picture(5)])},
        max_new_tokens=5,
        stop_token_ids=[tokenizer.eos_token_id],
        suppress_token_ids=[IMAGE_ID],
    )[0]
    assert replies == [tokenizer.decode(expected, skip_special_tokens=True)] * 2


def test_running_out_of_memory_while_decoding_is_not_called_a_corrupt_image(tmp_path, monkeypatch):
    """The gateway answers an ImageError with 400 'invalid image': a MemoryError is the server's trouble
    and must stay one (a 5xx), not become the client's fault."""
    from PIL import ImageOps

    from minimind.data.images import load_image

    path = tmp_path / "fine.png"
    Image.new("RGB", (8, 8)).save(path)

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(ImageOps, "exif_transpose", out_of_memory)
    with pytest.raises(MemoryError):
        load_image(path)
