"""vLLM behind Ray Serve LLM (`ray.serve.llm`): `python jobs/serve.py --engine vllm` on a cluster with a GPU.

vLLM runs the text model with its own kernels from the Hugging Face folder `export_hf` writes (Llama for
MiniMind2, Qwen3 or Qwen3-MoE for minimind-3: architectures vLLM implements). The folder is staged on the
run's storage, as every stage's inputs are, so the replica's node reads it wherever it runs: an `s3://`,
`gs://`, `abfss://` or `azure://` location goes to Ray Serve LLM as a cloud mirror, a shared folder as a
path. MiniMind-V has no vLLM architecture: its vision model stays on our engine.

vLLM's engine is a CUDA program here, so a cluster without a GPU is refused before anything is exported.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from minimind import storage, tracking

VLLM_ARCHITECTURES = ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")  # what export_hf writes
CLOUD_SCHEMES = ("s3://", "gs://", "abfss://", "azure://")  # Ray Serve LLM's cloud mirrors


def refuse_without_gpu(resources: dict) -> None:
    if resources.get("GPU", 0) < 1:
        raise SystemExit(
            f"--engine vllm needs a GPU: vLLM's engine runs on CUDA, and this cluster has {resources.get('GPU', 0):g} GPUs. "
            "Serve on CPU with our engine (leave out --engine), or add GPU nodes (--wait-for-nodes for an autoscaler's)"
        )


def import_serve_llm():
    try:
        from ray.serve import llm
    except ImportError as error:
        raise SystemExit(f"--engine vllm needs vLLM in Ray Serve LLM: pip install 'ray[llm]' ({error})") from None
    return llm


def stage_hf_folder(model: str, storage_path: str) -> str:
    """The model (folder or models:/ URI, adapters merged) as a Hugging Face folder on the run's storage."""
    from minimind.model.hf import export_hf

    destination = storage.join(storage_path, f"serve-vllm-{time.strftime('%Y%m%d-%H%M%S')}", "hf")
    with tracking.resolved_model(model) as folder, tempfile.TemporaryDirectory(prefix="minimind-hf-") as scratch:
        return storage.stage_input(export_hf(folder, Path(scratch) / "hf"), destination)


def llm_config(model_id: str, staged: str, num_replicas="1", max_replicas: int = 2, accelerator_type: str | None = None,
               engine_kwargs: dict | None = None) -> dict:
    """LLMConfig's fields for one model staged at `staged`."""
    source = {"bucket_uri": staged} if staged.startswith(CLOUD_SCHEMES) else staged
    if num_replicas == "auto":
        autoscaling = {"min_replicas": 1, "max_replicas": max_replicas}
    else:
        autoscaling = {"min_replicas": int(num_replicas), "max_replicas": int(num_replicas)}
    config = {
        "model_loading_config": {"model_id": model_id, "model_source": source},
        "deployment_config": {"autoscaling_config": autoscaling},
        "engine_kwargs": {"dtype": "bfloat16", **(engine_kwargs or {})},  # the export's weights are fp32
    }
    if accelerator_type:
        config["accelerator_type"] = accelerator_type
    return config


def build_vllm_app(configs: list[dict]):
    """An OpenAI-compatible Serve app (`/v1/chat/completions`, `/v1/completions`, `/v1/models`) of vLLM replicas."""
    llm = import_serve_llm()
    return llm.build_openai_app({"llm_configs": [llm.LLMConfig(**config) for config in configs]})
