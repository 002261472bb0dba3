"""The serving core without Ray: request validation, the reasoning split, and the batching engine."""

import asyncio

import pytest

from conftest import random_model
from minimind.generate import generate
from minimind.serve.engine import BatchingEngine
from minimind.serve.protocol import APIError, Limits, parse_chat_request, split_reasoning

THINK, ANSWER = ("<think>", "</think>"), ("<answer>", "</answer>")
MODELS = {"minimind": False, "minimind-v": True}


def test_a_reasoning_reply_splits_into_reasoning_and_content_at_every_point_of_its_stream():
    reply = "<think>\n12 加 30\n等于 42\n</think>\n<answer>\n42\n</answer>"
    assert split_reasoning(reply, THINK, ANSWER) == ("12 加 30\n等于 42", "42")
    sent_reasoning, sent_content = "", ""
    for end in range(1, len(reply) + 1):  # what a client sees: each split extends the previous one
        reasoning, content = split_reasoning(reply[:end], THINK, ANSWER)
        assert reasoning.startswith(sent_reasoning) and content.startswith(sent_content), reply[:end]
        assert "<" not in reasoning and "<" not in content
        sent_reasoning, sent_content = reasoning, content
    assert (sent_reasoning, sent_content) == ("12 加 30\n等于 42", "42")
    assert split_reasoning("就是 42", THINK, ANSWER) == ("", "就是 42")


def test_valid_requests_parse_with_defaults_and_content_parts():
    request = parse_chat_request({"model": "minimind-v", "messages": [
        {"role": "system", "content": "简短回答"},
        {"role": "user", "content": [{"type": "text", "text": "看"}, {"type": "image_url", "image_url": {"url": _png()}}]},
    ], "stop": "。", "max_tokens": 7}, MODELS, Limits())
    assert request.messages[1] == {"role": "user", "content": "看<image>\n"} and len(request.images) == 1
    assert (request.stop, request.max_tokens, request.temperature, request.top_p, request.stream) == (["。"], 7, 1.0, 1.0, False)


@pytest.mark.parametrize("body, status", [
    ([], 400), ({"messages": [{"role": "user", "content": "x"}]}, 400),
    ({"model": "minimind", "messages": [{"role": "assistant", "content": "x"}]}, 400),
    ({"model": "minimind", "messages": [{"role": "user", "content": 5}]}, 400),
    ({"model": "minimind", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, 400),
    ({"model": "minimind", "messages": [{"role": "user", "content": "x"}], "seed": 1.5}, 400),
    ({"model": "minimind", "messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400),
    ({"model": "minimind", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400),
    ({"model": "minimind", "messages": [{"role": "user", "content": "x"}], "temperature": float("nan")}, 400),
])
def test_invalid_requests_raise_api_errors(body, status):
    with pytest.raises(APIError) as raised:
        parse_chat_request(body, MODELS, Limits())
    assert raised.value.status == status and raised.value.body()["error"]["message"]


def _png():
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_concurrent_requests_decode_in_one_batch_with_the_same_tokens_as_alone():
    model = random_model(vocab_size=64)
    prompts = [[1, 5, 9], [1, 7], [1, 3, 4, 8, 2 + 10], [1, 11, 12]]
    limits = [6, 3, 6, 5]
    alone = [generate(model, [prompt], max_new_tokens=n, stop_token_ids=[2])[0] for prompt, n in zip(prompts, limits)]

    async def run():
        engine = BatchingEngine(model, stop_token_ids=[2], max_batch_size=8, batch_wait_s=0.05)

        async def one(prompt, n):
            return [token async for token in engine.stream(prompt, [], 0.0, 1.0, None, n)]

        together = await asyncio.gather(*(one(p, n) for p, n in zip(prompts, limits)))
        return together, engine

    together, engine = asyncio.run(run())
    assert together == alone
    assert engine.batch_sizes == [4]


def test_a_request_that_stops_listening_leaves_the_batch():
    model = random_model(vocab_size=64)

    async def run():
        engine = BatchingEngine(model, stop_token_ids=[], max_batch_size=8, batch_wait_s=0.01)
        stream = engine.stream([1, 5, 9], [], 0.0, 1.0, None, 1000)
        first = await stream.__anext__()
        await stream.aclose()  # the client went away
        while engine.running or not engine.last_batch:
            await asyncio.sleep(0.01)
        return first, engine.last_batch

    first, last_batch = asyncio.run(run())
    assert isinstance(first, int) and last_batch[0][1] == 1000 and last_batch[0][0] < 1000


def test_a_decode_loop_that_finishes_no_step_fails_the_replicas_health_check():
    """Serve's check_health on a model replica fails while its decode loop hangs (a stuck kernel, here a
    forward that waits), and passes again once it moves."""
    import threading
    from types import SimpleNamespace

    import torch

    from minimind.serve.app import ModelServer

    model, release = random_model(vocab_size=64), threading.Event()

    class Hanging(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config = model, model.config

        def forward(self, *args, **kwargs):
            release.wait(30)
            return self.inner(*args, **kwargs)

    engine = BatchingEngine(Hanging(), stop_token_ids=[], max_batch_size=2, batch_wait_s=0.0)
    server = ModelServer.func_or_class.__new__(ModelServer.func_or_class)  # the replica class, without loading a model
    server.chat_model, server.stuck_after_s = SimpleNamespace(engine=engine, takes_images=False), 0.05

    async def run():
        server.check_health()  # idle: healthy
        reply = asyncio.create_task(asyncio.wait_for(_collect(engine.stream([1, 5], [], 0.0, 1.0, None, 2)), 30))
        while engine.stuck_for() <= 0.05:
            await asyncio.sleep(0.01)
        with pytest.raises(RuntimeError, match="finished no step"):
            server.check_health()
        assert server.health()["ok"] is False and server.health()["decoding"]
        release.set()
        assert len(await reply) == 2
        server.check_health()
        assert server.health()["ok"]

    asyncio.run(run())


async def _collect(stream):
    return [token async for token in stream]


def test_the_serve_config_file_builds_the_same_app():
    from pathlib import Path

    import yaml

    from minimind.serve.app import build_app

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "serve_config.yaml").read_text())
    (application,) = config["applications"]
    assert application["import_path"] == "minimind.serve.app:build_app"
    app = build_app(application["args"])  # binds the deployments; nothing starts until serve.run
    assert type(app).__name__ == "Application"
    assert [spec["name"] for spec in application["args"]["models"]] == ["minimind", "minimind-v"]
