import json

import pytest
import torch
from conftest import random_model

from minimind.inference.generate import generate
from minimind.model.checkpoint import load_model, save_model
from minimind.model.hf import export_hf

YARN = {"factor": 4.0, "original_max_position_embeddings": 256, "beta_fast": 32, "beta_slow": 1}


def test_save_load_round_trip_is_bit_exact(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "model")
    reloaded = load_model(tmp_path / "model")
    original, restored = tiny_model.state_dict(), reloaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[name], restored[name]) for name in original)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight  # still tied
    assert reloaded.config == tiny_model.config
    ids = torch.randint(3, 6400, (2, 9))
    with torch.no_grad():
        assert torch.equal(tiny_model(ids).logits, reloaded(ids).logits)


def test_directory_holds_safetensors_and_json_only(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["hidden_size"] == 64
    assert (tmp_path / "model.safetensors").read_bytes()[8:9] == b"{"  # a safetensors JSON header, not a pickle


def test_load_reports_what_is_missing(tmp_path, tiny_model):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_model(tmp_path)
    save_model(tiny_model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="does not match its config"):
        load_model(tmp_path)


def test_tokenizer_files_are_saved_beside_the_weights(tmp_path, tiny_model, byte_tokenizer):
    save_model(tiny_model, tmp_path, tokenizer=byte_tokenizer)
    assert (tmp_path / "tokenizer.json").is_file()


@pytest.mark.parametrize("rope_scaling", [None, YARN], ids=["rope", "yarn"])
def test_hugging_face_export_matches_our_logits(tmp_path, rope_scaling):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model = random_model(rope_scaling=rope_scaling)
    save_model(model, tmp_path / "ours")
    export_hf(tmp_path / "ours", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(hf, LlamaForCausalLM)
    ids = torch.randint(3, 6400, (2, 300))  # past YaRN's original 256 positions
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max() <= 1e-4


def test_hugging_face_generate_agrees_with_ours(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    save_model(tiny_model, tmp_path / "ours")
    hf = AutoModelForCausalLM.from_pretrained(export_hf(tmp_path / "ours", tmp_path / "hf")).eval()
    prompt = [5, 17, 99, 1024, 7]
    ours = generate(tiny_model, [prompt], max_new_tokens=8, stop_token_ids=[])[0]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert theirs[0, len(prompt):].tolist() == ours


def test_moe_export_is_refused_clearly(tmp_path):
    save_model(random_model("tiny-moe"), tmp_path / "moe")
    with pytest.raises(ValueError, match="only dense MiniMind models can be exported"):
        export_hf(tmp_path / "moe", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
