"""The MLflow model every registered version carries, so MLflow's own tools work on the registry:

    mlflow.pyfunc.load_model("models:/minimind-sft/1").predict({"messages": [{"role": "user", "content": "你好"}]})
    mlflow models serve -m models:/minimind-sft/1 --env-manager local     # POST /invocations {"inputs": {...}}

A pyfunc flavour whose loader is this module: the model folder is the flavour's data, and the minimind
package travels with it as code. `predict` takes one chat or a list of them (or a DataFrame with a
`messages` column, as `mlflow models serve` hands them over), each a list of {"role", "content"}
messages; a MiniMind-V model also takes `images`, base64-encoded, one per <image> marker. It returns
one reply per chat. Params: max_tokens, temperature, top_p, seed.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import torch

PARAMS = {"max_tokens": 256, "temperature": 0.0, "top_p": 1.0, "seed": -1}  # seed -1: none


def chat_signature(takes_images: bool):
    """The signature the registry shows: messages (and images for a VLM) in, one reply out, sampling as params."""
    from mlflow.models import infer_signature

    example = {"messages": [{"role": "user", "content": "你好"}], **({"images": ["aW1hZ2U="]} if takes_images else {})}
    return infer_signature(example, ["reply"], params=PARAMS)


def log_chat_model(directory: str | Path, name: str) -> str:
    """Log a model folder as this pyfunc model in the active run (or none); returns the LoggedModel's id."""
    import mlflow

    import minimind
    from minimind.model.vision import is_vlm_dir

    info = mlflow.pyfunc.log_model(
        name=name, loader_module=__name__, data_path=str(directory), code_paths=[str(Path(minimind.__file__).parent)],
        signature=chat_signature(is_vlm_dir(directory)),
        pip_requirements=["torch>=2.5", "transformers", "tokenizers", "safetensors", "pillow", "numpy"],
    )
    return info.model_id


class ChatPredictor:
    """A model folder answering chats greedily or sampled, with its tokenizer's template and stop token."""

    def __init__(self, model_dir: str | Path):
        from minimind.model.checkpoint import load_model
        from minimind.inference.generate import inference_dtype
        from minimind.model.tokenizer import load_tokenizer
        from minimind.model.vision import is_vlm_dir, load_vlm

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.takes_images = is_vlm_dir(model_dir)
        self.model = (load_vlm if self.takes_images else load_model)(model_dir, device=device, dtype=inference_dtype("bf16", device))
        self.tokenizer = load_tokenizer(model_dir)
        self.stop_ids = sorted({self.model.config.eos_token_id, self.tokenizer.eos_token_id} - {None})

    def predict(self, model_input, params: dict | None = None) -> list[str]:
        from minimind.inference.generate import SamplingParams, generate

        params = {**PARAMS, **(params or {})}
        replies = []
        for chat in _chats(model_input):
            prompt, inputs = self._prompt(chat)
            sampling = SamplingParams(
                max_new_tokens=int(params["max_tokens"]), temperature=float(params["temperature"]), top_p=float(params["top_p"]),
                seed=None if int(params["seed"]) < 0 else int(params["seed"]), stop_token_ids=self.stop_ids,
                suppress_token_ids=[self.model.image_token_id] if self.takes_images else None,
            )
            tokens = generate(self.model, [prompt], sampling, prompt_inputs=inputs)[0]
            replies.append(self.tokenizer.decode(tokens, skip_special_tokens=True))
        return replies

    def _prompt(self, chat: dict) -> tuple[list[int], dict | None]:
        messages = [{"role": m["role"], "content": m["content"]} for m in chat["messages"]]
        if not self.takes_images:
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)), None
        from minimind.data.images import load_image
        from minimind.inference.chat import prompt_ids

        images = [load_image(io.BytesIO(base64.b64decode(data)), name="image") for data in chat.get("images") or []]
        return prompt_ids(self.model, self.tokenizer, messages), ({"pixel_values": self.model.pixel_values(images)} if images else None)


def _chats(model_input) -> list[dict]:
    """One chat, a list of them, or a DataFrame of them -> [{"messages": [...], "images": [...]}, ...]."""
    if hasattr(model_input, "to_dict"):  # a pandas DataFrame
        model_input = model_input.to_dict(orient="records")
    chats = [model_input] if isinstance(model_input, dict) else list(model_input)
    for chat in chats:
        if not isinstance(chat, dict) or not isinstance(chat.get("messages"), (list, tuple)) and not hasattr(chat.get("messages"), "tolist"):
            raise ValueError('each input is {"messages": [{"role": ..., "content": ...}, ...]}')
        if hasattr(chat["messages"], "tolist"):  # numpy arrays out of a DataFrame
            chat["messages"] = chat["messages"].tolist()
        if hasattr(chat.get("images"), "tolist"):
            chat["images"] = chat["images"].tolist()
    return chats


def load_predictor(data_path: str | Path) -> ChatPredictor:
    """The predictor of a model folder; LoRA adapters are merged into their base first, in a temporary
    folder removed once the merged model is loaded."""
    from minimind.model.lora import is_adapter_dir

    if not is_adapter_dir(data_path):
        return ChatPredictor(data_path)
    from minimind.tracking import resolved_model

    with resolved_model(str(data_path)) as model_dir:
        return ChatPredictor(model_dir)


def _load_pyfunc(data_path: str) -> ChatPredictor:
    """MLflow's entry point: `data_path` is the model folder."""
    return load_predictor(data_path)
