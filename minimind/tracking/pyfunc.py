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
from typing import TYPE_CHECKING

import mlflow

import minimind
from minimind.data.images import load_image
from minimind.data.tools import check_tools
from minimind.inference.chat import Chat
from minimind.inference.generate import generate
from minimind.model.lora import is_adapter_dir
from minimind.model.vision import is_vlm_dir
from minimind.tracking.registry import CONFIG_NAME, MODEL_MARKERS, check_alias, mark_failed, register_logged_model, resolved_model
from minimind.tracking.store import mlflow_client

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

PARAMS = {"max_tokens": 256, "temperature": 0.0, "top_p": 1.0, "seed": -1}  # seed -1: none


def chat_signature(takes_images: bool):
    """The signature the registry shows: messages (and images for a VLM) in, one reply out, sampling as params;
    optionally `tools`, the JSON text of OpenAI-shaped functions the reply may call."""
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import ColSpec, Schema

    example = {"messages": [{"role": "user", "content": "你好"}], **({"images": ["aW1hZ2U="]} if takes_images else {})}
    inferred = infer_signature(example, ["reply"], params=PARAMS)
    inputs = Schema([*inferred.inputs.inputs, ColSpec("string", "tools", required=False)])
    return ModelSignature(inputs, inferred.outputs, inferred.params)


def log_chat_model(directory: str | Path, name: str) -> str:
    """Log a model folder as this pyfunc model in the active run (or none); returns the LoggedModel's id."""
    import mlflow

    info = mlflow.pyfunc.log_model(
        name=name, loader_module=__name__, data_path=str(directory), code_paths=[str(Path(minimind.__file__).parent)],
        signature=chat_signature(is_vlm_dir(directory)),
        pip_requirements=["torch>=2.5", "transformers", "tokenizers", "safetensors", "pillow", "numpy"],
    )
    return info.model_id


class ChatPredictor:
    """A model folder answering chats greedily or sampled, with its tokenizer's template and stop token. With
    `tools`, the reply keeps the calls it writes (`<tool_call>{...}</tool_call>`, read by
    minimind.data.tools.parse_calls); sent back as the assistant's content, with the results as `tool` messages,
    they make the next turn."""

    def __init__(self, model_dir: str | Path):
        self.chat = Chat.load(model_dir)

    def predict(self, model_input, params: dict | None = None) -> list[str]:
        params = {**PARAMS, **(params or {})}
        replies = []
        for chat in _chats(model_input):
            messages = [{"role": m["role"], "content": m["content"]} for m in chat["messages"]]
            pictures = chat.get("images") or [] if self.chat.takes_images else []  # a text model has no use for them
            images = [load_image(io.BytesIO(base64.b64decode(data)), name="image") for data in pictures]
            sampling = self.chat.sampling(
                max_new_tokens=int(params["max_tokens"]), temperature=float(params["temperature"]), top_p=float(params["top_p"]),
                seed=None if int(params["seed"]) < 0 else int(params["seed"]),
            )
            inputs = {"pixel_values": self.chat.pixel_values(images)} if images else None
            tools = check_tools(chat["tools"]) if isinstance(chat.get("tools"), str) and chat["tools"] else None
            tokens = generate(self.chat.model, [self.chat.prompt_ids(messages, tools)], sampling, prompt_inputs=inputs)[0]
            replies.append(self.chat.tokenizer.decode(tokens, skip_special_tokens=tools is None))
        return replies


def _chats(model_input) -> list[dict]:
    """One chat, a list of them, or a DataFrame of them -> [{"messages": [...], "images": [...]}, ...]."""
    if hasattr(model_input, "to_dict"):  # a pandas DataFrame
        model_input = model_input.to_dict(orient="records")
    chats = [model_input] if isinstance(model_input, dict) else list(model_input)
    for chat in chats:
        if (
            not isinstance(chat, dict)
            or not isinstance(chat.get("messages"), (list, tuple))
            and not hasattr(chat.get("messages"), "tolist")
        ):
            raise ValueError('each input is {"messages": [{"role": ..., "content": ...}, ...]}')
        if hasattr(chat["messages"], "tolist"):  # numpy arrays out of a DataFrame
            chat["messages"] = chat["messages"].tolist()
        if hasattr(chat.get("images"), "tolist"):
            chat["images"] = chat["images"].tolist()
    return chats


def load_predictor(data_path: str | Path) -> ChatPredictor:
    """The predictor of a model folder; LoRA adapters are merged into their base first, in a temporary
    folder removed once the merged model is loaded."""
    if not is_adapter_dir(data_path):
        return ChatPredictor(data_path)

    with resolved_model(str(data_path)) as model_dir:
        return ChatPredictor(model_dir)


def _load_pyfunc(data_path: str) -> ChatPredictor:
    """MLflow's entry point: `data_path` is the model folder."""
    return load_predictor(data_path)


def log_model_dir(directory: str | Path, name: str, run_id: str | None = None) -> str:
    """Log a model directory as an MLflow LoggedModel of the run (default: the active run), READY but not
    registered, and return its id: `models:/<id>` downloads it from any node that reaches the tracking
    server. It is an MLflow pyfunc model (`minimind.tracking.pyfunc`) with the folder as its data, so
    `mlflow.pyfunc.load_model` and `mlflow models serve` answer chats with it. MLflow marks a failure
    midway FAILED."""
    directory = Path(directory)
    if not any((directory / marker).is_file() for marker in MODEL_MARKERS):
        raise FileNotFoundError(
            f"{directory} has no {CONFIG_NAME}; log a directory written by minimind.model.checkpoint.save_model "
            "(or LoRA adapters written by minimind.model.lora.save_adapter)"
        )
    mlflow_client()  # the store, set up
    active = mlflow.active_run()
    if run_id is not None and (active is None or active.info.run_id != run_id):
        with mlflow.start_run(run_id=run_id, nested=active is not None):
            return log_chat_model(directory, name)
    return log_chat_model(directory, name)


def register_model_dir(
    directory: str | Path,
    name: str,
    run_id: str | None = None,
    alias: str | None = None,
    tags: dict | None = None,
) -> "ModelVersion":
    """Register a model directory as the next version of `name`: a LoggedModel (linked to `run_id`, default
    the active run) whose artifacts are the directory's files, then a registry version pointing at it.

    MLflow 3 cannot register `runs:/ID/dir` of plain files; the LoggedModel flow is the way that works.
    Arguments are checked before anything is logged, and a failure midway marks the LoggedModel FAILED
    and removes a version already created, so a registered version is always complete.
    """
    if alias is not None:
        check_alias(alias)
    model_id = log_model_dir(directory, name, run_id)
    try:
        return register_logged_model(model_id, name, alias, tags)
    except BaseException:
        mark_failed(model_id)
        raise
