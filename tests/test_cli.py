import json
import shutil
import subprocess
import sys

import pytest
from conftest import random_model

from minimind.cli import main
from minimind.model.checkpoint import save_model


@pytest.fixture
def model_dir(tmp_path, byte_tokenizer):
    model = random_model(vocab_size=len(byte_tokenizer))
    return save_model(model, tmp_path / "model", tokenizer=byte_tokenizer)


def test_console_script_is_installed():
    executable = shutil.which("minimind") or shutil.which("minimind", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert executable, "the `minimind` console script is not on PATH"
    result = subprocess.run([executable, "--help"], capture_output=True, text=True, check=True)
    assert "export-hf" in result.stdout and "generate" in result.stdout


def test_generate_prints_a_continuation(model_dir, capsys, byte_tokenizer):
    main(["generate", "--model", str(model_dir), "--prompt", "从前有座山", "--max-new-tokens", "8"])
    printed = capsys.readouterr().out
    assert printed.strip()
    assert len(byte_tokenizer(printed.strip(), add_special_tokens=False)["input_ids"]) <= 8 + 2


def test_chat_uses_the_chat_template(model_dir, capsys):
    main(["chat", "--model", str(model_dir), "--prompt", "hello", "--max-new-tokens", "5", "--temperature", "0.8", "--seed", "1"])
    assert capsys.readouterr().out.strip()


def test_generate_without_tokenizer_is_a_clear_error(tmp_path):
    save_model(random_model(), tmp_path)
    with pytest.raises(SystemExit, match="has no tokenizer files"):
        main(["generate", "--model", str(tmp_path), "--prompt", "hi"])


def test_export_hf_command(model_dir, tmp_path, capsys):
    main(["export-hf", str(model_dir), str(tmp_path / "hf")])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("hello").input_ids  # the tokenizer travels with the export
    assert "AutoModelForCausalLM" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="nowhere is neither a directory nor a models:/ or runs:/ URI"):
        main(["export-hf", str(tmp_path / "nowhere"), str(tmp_path / "out")])


def test_demo_learns_and_round_trips(tmp_path, capsys):
    main(["demo", "--steps", "60", "--output", str(tmp_path / "demo")])
    printed = capsys.readouterr().out
    assert "weights bit-identical = True" in printed
    assert "KV-cached decoding equals full recomputation: True" in printed
    losses = [float(line.split("loss")[1].split()[0]) for line in printed.splitlines() if line.strip().startswith("step")]
    assert losses[-1] < losses[0] / 2


def test_chat_with_an_image_needs_a_vlm_and_answers_with_one(tmp_path, model_dir, capsys):
    from PIL import Image
    from test_vision import clip_tower

    from minimind.model.tokenizer import train_tokenizer
    from minimind.model.vision import MiniMindVLM, save_vlm

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    with pytest.raises(SystemExit, match="--image needs a MiniMind-V model"):
        main(["chat", "--model", str(model_dir), "--image", str(tmp_path / "red.png"), "--prompt", "hi"])

    tokenizer = train_tokenizer(["图中有一个红色的圆形。"] * 20, vocab_size=300)
    save_vlm(MiniMindVLM(random_model(vocab_size=len(tokenizer)), *clip_tower(), image_token_id=7), tmp_path / "vlm", tokenizer)
    for prompt in ("图中有什么？", "<image>\n图中有什么？"):  # the image goes first unless the prompt places it
        main(
            [
                "chat",
                "--model",
                str(tmp_path / "vlm"),
                "--image",
                str(tmp_path / "red.png"),
                "--prompt",
                prompt,
                "--max-new-tokens",
                "4",
            ]
        )
        assert capsys.readouterr().out.strip()
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(SystemExit, match="broken.png: not a readable image"):
        main(["chat", "--model", str(tmp_path / "vlm"), "--image", str(tmp_path / "broken.png"), "--prompt", "hi"])
