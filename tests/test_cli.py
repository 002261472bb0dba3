import json
import shutil
import subprocess
import sys

import pytest

from conftest import random_model
from minimind.checkpoint import save_model
from minimind.cli import main


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
    with pytest.raises(SystemExit, match="is not a MiniMind model directory"):
        main(["export-hf", str(tmp_path / "nowhere"), str(tmp_path / "out")])


def test_demo_learns_and_round_trips(tmp_path, capsys):
    main(["demo", "--steps", "60", "--output", str(tmp_path / "demo")])
    printed = capsys.readouterr().out
    assert "weights bit-identical = True" in printed
    assert "KV-cached decoding equals full recomputation: True" in printed
    losses = [float(line.split("loss")[1].split()[0]) for line in printed.splitlines() if line.strip().startswith("step")]
    assert losses[-1] < losses[0] / 2
