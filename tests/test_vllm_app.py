"""`jobs/serve.py --engine vllm`: what can be checked without a GPU or vLLM. The exported folder names an
architecture vLLM implements, the app's config is one Ray Serve LLM's own model accepts, and a cluster without
a GPU is refused at once, before anything is exported."""

import json
import sys
from pathlib import Path

import pytest
from conftest import random_model

from minimind.model.checkpoint import save_model
from minimind.model.hf import export_hf
from minimind.serve.vllm_app import VLLM_ARCHITECTURES, llm_config, refuse_without_gpu


@pytest.mark.parametrize("shape", [{}, {"qk_norm": True}, {"qk_norm": True, "num_experts": 4, "num_experts_per_tok": 1}],
                         ids=["minimind2", "minimind-3", "minimind-3-moe"])
def test_the_export_is_an_architecture_vllm_implements(tmp_path, byte_tokenizer, shape):
    from transformers import AutoConfig, AutoTokenizer

    save_model(random_model(vocab_size=len(byte_tokenizer), **shape), tmp_path / "model", tokenizer=byte_tokenizer)
    folder = export_hf(tmp_path / "model", tmp_path / "hf")
    fields = json.loads((folder / "config.json").read_text())
    assert fields["architectures"][0] in VLLM_ARCHITECTURES
    assert fields["tie_word_embeddings"] is True and fields["head_dim"] == 16
    assert AutoConfig.from_pretrained(folder).architectures == fields["architectures"]  # what vLLM reads it with
    assert AutoTokenizer.from_pretrained(folder).chat_template == byte_tokenizer.chat_template


def test_ray_serve_llm_accepts_the_config_with_a_path_or_a_cloud_mirror():
    # ray.serve.llm.LLMConfig is this class; ray.serve.llm itself imports only where vLLM is installed
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    shared = LLMConfig(**llm_config("minimind", "/shared/runs/serve-vllm/hf", num_replicas="auto", max_replicas=3))
    assert shared.model_loading_config.model_source == "/shared/runs/serve-vllm/hf"
    assert shared.deployment_config["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3}
    assert shared.engine_kwargs == {"dtype": "bfloat16"}
    mirrored = LLMConfig(**llm_config("minimind", "s3://bucket/runs/serve-vllm/hf", accelerator_type="H100"))
    assert mirrored.model_loading_config.model_source.bucket_uri == "s3://bucket/runs/serve-vllm/hf"
    assert mirrored.accelerator_type == "H100"


def test_vllm_is_refused_on_a_cluster_without_a_gpu(ray_cluster, tmp_path):
    import ray

    refuse_without_gpu({"CPU": 8, "GPU": 1})
    with pytest.raises(SystemExit, match="--engine vllm needs a GPU: vLLM's engine runs on CUDA, and this cluster has 0 GPUs"):
        refuse_without_gpu({"CPU": 8})
    if ray.cluster_resources().get("GPU", 0):
        pytest.skip("this machine has a GPU: the job's own refusal cannot be seen here")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    from serve import main

    with pytest.raises(SystemExit, match="needs a GPU"):
        main(["--engine", "vllm", "--text", str(tmp_path / "nowhere"), "--storage-path", str(tmp_path / "storage")])
    assert not (tmp_path / "storage").exists()  # refused before exporting or staging anything
