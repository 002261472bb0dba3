"""The serving core without Ray: request validation, the reasoning split, and the batching engine."""

import asyncio

import pytest
import torch
from conftest import random_model

from minimind.inference.generate import generate
from minimind.inference.sampling import SamplingParams
from minimind.serve.engine import BatchingEngine, releasable
from minimind.serve.errors import APIError
from minimind.serve.protocol import Limits, parse_chat_request, split_reasoning

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
            return [token async for chunk in engine.stream(prompt, SamplingParams(n)) for token in chunk]

        together = await asyncio.gather(*(one(p, n) for p, n in zip(prompts, limits)))
        return together, engine

    together, engine = asyncio.run(run())
    assert together == alone
    assert engine.batch_sizes == [4]


SETTINGS = [SamplingParams(40), SamplingParams(40, temperature=0.9, top_p=0.9, seed=11),
            SamplingParams(40, temperature=1.3, top_k=5, repetition_penalty=1.2, seed=5), SamplingParams(40, temperature=0.7)]


def test_requests_with_any_settings_join_the_running_batch_and_seeded_ones_sample_as_alone():
    """Four different sampling settings arriving one after another all decode in the one running batch
    (no request waits for another setting's batch to drain), and each seeded request gets exactly the
    tokens it gets alone, in bf16 as served, whoever joins the batch around it."""
    model = random_model(vocab_size=64).to(torch.bfloat16)
    prompts = [[1, 5, 9], [1, 7], [1, 3, 4, 8], [1, 11, 12]]

    async def run(order, gap_steps):
        engine = BatchingEngine(model, stop_token_ids=[], max_batch_size=8, batch_wait_s=0.0)
        results = {}

        async def one(index):
            results[index] = []
            async for chunk in engine.stream(prompts[index], SETTINGS[index]):
                results[index] += chunk

        tasks = []
        for index in order:
            tasks.append(asyncio.create_task(one(index)))
            while len(results.get(index, [])) < gap_steps:  # the batch decodes on before the next one arrives
                await asyncio.sleep(0.001)
        await asyncio.gather(*tasks)
        return results, engine

    alone = {index: asyncio.run(run([index], 0))[0][index] for index in range(4)}
    mixed, engine = asyncio.run(run([0, 1, 2, 3], 3))
    assert engine.batches_run == 1 and max(engine.batch_sizes) == 4  # one session: every setting joined it
    assert mixed[1] == alone[1] and mixed[2] == alone[2]  # seeded: the same tokens in company as alone
    assert mixed[0] == alone[0]  # greedy too
    reversed_order, _ = asyncio.run(run([3, 2, 1, 0], 5))
    assert reversed_order[1] == alone[1] and reversed_order[2] == alone[2]
    assert len(set(map(tuple, alone.values()))) == 4


def test_released_text_never_shows_part_of_a_stop_string_or_half_a_character():
    from minimind.demo import demo_tokenizer
    from minimind.model.tokenizer import load_tokenizer

    assert releasable("答案是 4", ["42"]) == ("答案是 ", False)  # "4" may begin "42": held back
    assert releasable("答案是 43", ["42"]) == ("答案是 43", False)
    assert releasable("答案是 42。", ["42"]) == ("答案是 ", True)
    assert releasable("答案是 4", ["42"], final=True) == ("答案是 4", False)
    assert releasable("ab\ufffd", []) == ("ab", False)
    # stop strings match what was generated: "a", an invalid byte, "b" is not "ab" (it shows as "ab")
    assert releasable("a\ufffdb", ["ab"]) == ("ab", False)
    assert releasable("a\ufffdb", ["ab"], final=True) == ("ab", False)
    assert releasable("xa\ufffd", ["ab"]) == ("x", False)  # "a" may still begin "ab"
    tokenizer = load_tokenizer(demo_tokenizer())
    reply = "龘靐齉 😀 éß END"  # rare characters: byte-level tokens that split them
    ids = tokenizer.encode(reply, add_special_tokens=False)
    streamed, cut = "", False
    for end in range(1, len(ids) + 1):
        text, cut = releasable(tokenizer.decode(ids[:end]), ["END"])
        assert text.startswith(streamed) and "\ufffd" not in text and "E" not in text
        streamed = text
        if cut:
            break
    assert cut and streamed == "龘靐齉 😀 éß "
    assert any("\ufffd" in tokenizer.decode(ids[:end]) for end in range(1, len(ids)))  # the case is real


def streamed(replies: list[str], final_reply: str | None = None) -> tuple[str, str]:
    """What a client receives of a reply decoded in these steps: all reasoning and all content deltas."""
    from types import SimpleNamespace

    from minimind.serve.engine import Released

    markers = SimpleNamespace(think_start=THINK[0], think_end=THINK[1], answer_start=ANSWER[0], answer_end=ANSWER[1])
    released, reasoning, content = Released(markers), "", ""
    for text in replies:
        if delta := (released.extend(text, final=True) if text == final_reply else released.extend(text)):
            reasoning, content = reasoning + delta["reasoning"], content + delta["content"]
    return reasoning, content


def test_whitespace_before_the_think_tag_is_neither_reasoning_nor_content():
    reply = "\n <think>\n想\n</think>\n<answer>\nAB\n</answer>"
    assert streamed([reply[:end] for end in range(1, len(reply) + 1)]) == ("想", "AB")
    plain = " 你好"  # no think tag: the whitespace is part of the content
    assert streamed([plain[:end] for end in range(1, len(plain) + 1)]) == ("", " 你好")
    assert streamed([" ", " <th"], final_reply=" <th") == ("", " <th")  # the reply ended: nothing was arriving


def test_a_request_asking_past_the_context_ends_at_its_edge():
    model = random_model(vocab_size=64, max_position_embeddings=16)

    async def run():
        engine = BatchingEngine(model, stop_token_ids=[], max_batch_size=4, batch_wait_s=0.0)
        return await asyncio.wait_for(_collect(engine.stream(list(range(1, 11)), SamplingParams(100))), 30)

    assert len(asyncio.run(run())) == 6


def test_a_request_that_stops_listening_leaves_the_batch():
    model = random_model(vocab_size=64)

    async def run():
        engine = BatchingEngine(model, stop_token_ids=[], max_batch_size=8, batch_wait_s=0.01)
        stream = engine.stream([1, 5, 9], SamplingParams(1000))
        first = await stream.__anext__()
        await stream.aclose()  # the client went away
        while engine.running or not engine.last_batch:
            await asyncio.sleep(0.01)
        return first, engine.last_batch

    first, last_batch = asyncio.run(run())
    assert isinstance(first[0], int) and last_batch[0][1] == 1000 and last_batch[0][0] < 1000


def test_a_decode_loop_that_finishes_no_step_fails_the_replicas_health_check():
    """Serve's check_health on a model replica fails while its decode loop hangs (a stuck kernel, here a
    forward that waits), and passes again once it moves."""
    import threading
    from types import SimpleNamespace

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
        reply = asyncio.create_task(asyncio.wait_for(_collect(engine.stream([1, 5], SamplingParams(2))), 30))
        while engine.stuck_for() <= 0.05:
            await asyncio.sleep(0.01)
        with pytest.raises(RuntimeError, match="finished no step"):
            server.check_health()
        assert server.health()["ok"] is False and server.health()["decoding"]
        release.set()
        assert len(await reply) == 2
        while engine.running:  # the session winds down
            await asyncio.sleep(0.01)
        server.check_health()
        assert server.health()["ok"]

    asyncio.run(run())


async def _collect(stream):
    return [token async for chunk in stream for token in chunk]


def test_the_serve_config_file_builds_the_same_app():
    """The yaml is a valid Serve config, its args build the app, and its `deployments:` overrides name the app's
    deployments (Serve refuses an override of a deployment the app does not have)."""
    from pathlib import Path

    import yaml
    from ray.serve._private.build_app import build_app as build_serve_app  # private: how Serve names the deployments
    from ray.serve.schema import ServeDeploySchema

    from minimind.serve.app import build_app

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    assert application["import_path"] == "minimind.serve.app:build_app"
    app = build_app(application["args"])  # binds the deployments; nothing starts until serve.run
    assert type(app).__name__ == "Application"
    assert [spec["name"] for spec in application["args"]["models"]] == ["minimind", "minimind-v"]
    built = {deployment.name: deployment for deployment in build_serve_app(app, name=application["name"]).deployments}
    overrides = {override["name"]: override for override in application["deployments"]}
    assert set(overrides) == set(built) == {"minimind", "minimind-v", "Gateway"}
    assert all(override["max_queued_requests"] > 0 for name, override in overrides.items() if name != "Gateway")


def test_a_request_the_model_cannot_prefill_fails_alone_not_with_those_joining_beside_it():
    """Image placeholders without their image (what a user who types the tokenizer's image marker sends):
    the VLM refuses that prompt, and the requests that joined the batch at the same step still decode."""
    from test_vision import IMAGE_ID, picture, tiny_vlm

    vlm = tiny_vlm()
    pixels = vlm.pixel_values([picture(0)])
    with_image = [1, 5] + [IMAGE_ID] * vlm.image_tokens + [9]

    async def run():
        engine = BatchingEngine(vlm, stop_token_ids=[], suppress_token_ids=[IMAGE_ID], max_batch_size=8, batch_wait_s=0.05)

        async def one(prompt, pixel_values):
            try:
                return await _collect(engine.stream(prompt, SamplingParams(3), pixel_values))
            except ValueError as error:
                return str(error)

        replies = await asyncio.gather(
            one(with_image, pixels), one(with_image, None), one([1, 11, 12], None), one(with_image, pixels)
        )
        return replies, engine

    replies, engine = asyncio.run(run())
    assert engine.batch_sizes == [4]  # they did join together
    assert "image placeholder tokens for 0 image(s)" in replies[1]
    assert [len(reply) for i, reply in enumerate(replies) if i != 1] == [3, 3, 3], replies


def test_a_vlm_counts_image_markers_in_the_prompt_ids_whatever_spells_them(tmp_path):
    """A tokenizer may name another token its image marker (MiniMind-V's is <|image_pad|>; here <answer>):
    a user who types it sends image placeholders without an image, refused with a 400 before the batch."""
    from test_protocol import image_bytes
    from test_vision import clip_tower

    from minimind.demo import demo_tokenizer
    from minimind.model.tokenizer import Markers, load_tokenizer
    from minimind.model.vision import MiniMindVLM, save_vlm
    from minimind.serve.engine import ChatModel
    from minimind.serve.protocol import ChatRequest

    tokenizer = load_tokenizer(demo_tokenizer())
    marker = Markers.configure(tokenizer, {"image": "<answer>"})
    save_vlm(
        MiniMindVLM(random_model(vocab_size=len(tokenizer)), *clip_tower(), image_token_id=marker.image_id(tokenizer)),
        tmp_path / "vlm",
        tokenizer,
    )
    chat = ChatModel(tmp_path / "vlm", device="cpu", compile="off")

    async def events(content, images):
        return [
            event
            async for event in chat.chat(ChatRequest("m", [{"role": "user", "content": content}], images=images, max_tokens=2))
        ]

    with pytest.raises(APIError, match=r"1 image marker\(s\) \(<image> or <answer>\) in the messages but 0 image"):
        asyncio.run(events("<answer> 看", []))
    assert asyncio.run(events("<image>\n看", [image_bytes(size=(16, 16))]))[-1]["completion_tokens"] == 2


def test_paced_events_merge_text_deltas_between_sends_and_lose_nothing():
    """What a Serve replica sends the gateway: the first delta at once, then merged deltas no closer than the
    spacing; a held delta goes before a tool call or the end; with no spacing every delta goes as it came."""
    from minimind.serve.engine import paced

    def delta(reasoning="", content=""):
        return {"type": "delta", "reasoning": reasoning, "content": content}

    reply = [{"type": "start", "prompt_tokens": 3}, delta("想"), delta("一想"), delta("", "好"), delta("", "的"),
             {"type": "tool_calls", "calls": []}, delta("", "。"),
             {"type": "end", "finish_reason": "stop", "completion_tokens": 6}]

    async def events():
        for event in reply:
            yield event

    async def collect(spacing):
        return [event async for event in paced(events(), lambda: spacing)]

    assert asyncio.run(collect(0.0)) == reply
    assert asyncio.run(collect(3600.0)) == [reply[0], delta("想"), delta("一想", "好的"), reply[5], delta("", "。"), reply[7]]


def test_the_engine_wakes_the_event_loop_once_per_step_for_all_its_rows(monkeypatch):
    """Tokens reach the requests' queues from the decode thread in one hand-over per step, not one per token."""
    import minimind.serve.engine as serving

    handed = []
    send = serving._send
    monkeypatch.setattr(serving, "_send", lambda messages, loop: (handed.append(len(messages)), send(messages, loop)))
    engine = BatchingEngine(random_model(), stop_token_ids=[], max_batch_size=8, batch_wait_s=0.05)

    async def consume(stream):
        return [token async for chunk in stream for token in chunk]

    async def run_all():
        return await asyncio.gather(*(consume(engine.stream([5, 9, row], SamplingParams(6))) for row in range(4)))

    assert [len(out) for out in asyncio.run(run_all())] == [6] * 4
    assert engine.batch_sizes == [4]
    assert handed == [4] * 5 + [4 + 4]  # the prefill's tokens, 4 steps, then the last step's tokens with the 4 ends
