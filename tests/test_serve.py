"""The real Ray Serve app on small random models from a temporary MLflow registry: the official
`openai` client, streaming, images, every bad input, concurrency and a disconnecting client."""

import asyncio
import base64
import io
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict

import pytest
import torch
from PIL import Image

from minimind.demo.tools import demo_tools

API_KEY = "test-key"
REASONED_REPLY = "<think>\n先想一想。\n</think>\n<answer>\n你好！很高兴见到你。\n</answer>"
TOOLS = demo_tools()  # what the chat page offers
TOOL_QUESTION = [{"role": "user", "content": "1234 加 4321 等于几？"}]
CALL_REPLY = '<tool_call>\n{"name": "add", "arguments": {"a": 1234, "b": 4321}}\n</tool_call>'
AFTER_CALL = [*TOOL_QUESTION, {"role": "assistant", "content": "", "tool_calls": [
    {"function": {"name": "add", "arguments": {"a": 1234, "b": 4321}}}]}, {"role": "tool", "content": "5555"}]
MAX_BODY = 256 * 1024


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def png_data_url(size=(64, 64), colour=(220, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory, monkeypatch_module):
    from conftest import random_model
    from ray import serve

    from minimind import tracking
    from minimind.demo import demo_tokenizer, demo_vision_tower
    from minimind.model.checkpoint import save_model
    from minimind.model.tokenizer import load_tokenizer
    from minimind.model.vision import build_vlm, save_vlm
    from minimind.serve.app import ModelSpec, ServeSettings, build
    from minimind.serve.protocol import Limits

    home = tmp_path_factory.mktemp("serve-home")
    monkeypatch_module.setenv("MINIMIND_HOME", str(home))
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home}/mlflow.db")
    tracking.configure()
    tokenizer = load_tokenizer(demo_tokenizer())
    text = random_model("demo", std=0.2, vocab_size=len(tokenizer), max_position_embeddings=1024)
    with torch.no_grad():
        text.model.embed_tokens.weight[:8] = 0  # special tokens (end of turn, <think>...) get logit 0, which never wins:
        # greedy replies are plain text and run to max_tokens
    save_model(text, home / "text", tokenizer=tokenizer)
    tracking.register_model_dir(home / "text", "minimind-reason")
    save_model(random_model("tiny", vocab_size=len(tokenizer)), home / "llm", tokenizer=tokenizer)
    vlm, _ = build_vlm(home / "llm", demo_vision_tower())
    save_vlm(vlm, home / "vlm", tokenizer)
    tracking.register_model_dir(home / "vlm", "minimind-vlm-sft")
    # what a MiniMind user brings: a half-precision .pth and MiniMind2's ChatML tokenizer (no tag, no image token)
    from test_importer import chatml_tokenizer

    from minimind.model.hf import import_model

    chatml = chatml_tokenizer()
    chatml.save_pretrained(str(home / "chatml"))
    brought = random_model("tiny", vocab_size=len(chatml))
    with torch.no_grad():
        brought.model.embed_tokens.weight[:3] = 0  # its special tokens never win: the reply runs to max_tokens
    torch.save({k: v.half() for k, v in brought.state_dict().items()}, home / "full_sft_512.pth")
    import_model(home / "full_sft_512.pth", home / "imported", home / "chatml", {"num_attention_heads": 4})
    # a model that really reasons aloud (trained to answer 你好 with a <think> part, for the chat page's fold) and
    # calls a tool: the call for the sum, then the answer once the tool's result is in
    from conftest import memorized_model

    reasoner = memorized_model(tokenizer, [{"role": "user", "content": "你好"}], REASONED_REPLY,
                               also=((TOOL_QUESTION, CALL_REPLY, TOOLS), (AFTER_CALL, "等于 5555。", TOOLS)))
    save_model(reasoner, home / "reasoner", tokenizer=tokenizer)

    port = free_port()
    models = [
        # "minimind" decodes as a CPU replica does by default, its one-row steps compiled; the others stay eager (CI time)
        ModelSpec("minimind", "models:/minimind-reason/latest", num_cpus=0.5, batch_wait_ms=20),
        ModelSpec("minimind-v", "models:/minimind-vlm-sft/latest", num_cpus=0.5, compile="off"),
        ModelSpec("minimind-imported", str(home / "imported"), num_cpus=0.25, max_ongoing_requests=1, max_queued_requests=1,
                  compile="off"),
        ModelSpec("minimind-reasoner", str(home / "reasoner"), num_cpus=0.05, compile="off"),
    ]
    limits = Limits(
        max_tokens=600,
        max_image_pixels=100_000,
        max_body_bytes=MAX_BODY,
        max_messages=64,
        max_message_chars=4000,
        max_total_chars=8000,
        allow_remote_images=True,
    )  # remote fetching on: the address guard is what refuses
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    (home / "api-key").write_text(API_KEY + "\n")  # a mounted secret, read inside the gateway's replica
    settings = ServeSettings(
        models=models,
        limits=limits,
        api_key_file=str(home / "api-key"),
        api_key_env=None,
        tracking_uri=os.environ["MLFLOW_TRACKING_URI"],
        gateway_replicas=2,
    )
    assert API_KEY not in json.dumps(asdict(settings))  # what Serve's config, dashboard and `ps` could show holds no key
    serve.run(build(settings), name="minimind", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:  # routes go live a little after the port opens
        try:
            urllib.request.urlopen(base + "/healthz", timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    yield base
    serve.shutdown()


def post(base, body, key=API_KEY, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(base + "/v1/chat/completions", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read()
        try:
            return error.code, json.loads(text)
        except ValueError:  # a proxy-level failure (e.g. a replica dying) may not be JSON
            return error.code, {"raw": text.decode(errors="replace")}


def openai_client(base):
    from openai import OpenAI

    return OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0)


def hello(model="minimind", **extra):
    return {"model": model, "messages": [{"role": "user", "content": "你好"}], "max_tokens": 5, **extra}


def test_an_imported_minimind_checkpoint_with_its_own_tokenizer_answers_the_openai_client(server):
    reply = openai_client(server).chat.completions.create(
        model="minimind-imported", messages=[{"role": "user", "content": "你好"}], max_tokens=4, temperature=0
    )  # greedy: four sampled byte tokens can all be pieces of characters no token completes, which decode to nothing
    assert (
        reply.model == "minimind-imported" and reply.usage.completion_tokens == 4 and reply.choices[0].finish_reason == "length"
    )
    assert reply.choices[0].message.content


def test_openai_client_non_streaming(server):
    # greedy: a sampled reply of the random test model may be 6 byte fragments that decode to no whole character
    reply = openai_client(server).chat.completions.create(
        model="minimind", messages=[{"role": "user", "content": "你好"}], max_tokens=6, temperature=0
    )
    assert reply.object == "chat.completion" and reply.model == "minimind"
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "length"  # the test model never says its end-of-turn token
    assert reply.usage.completion_tokens == 6 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 6
    assert [m.id for m in openai_client(server).models.list().data] == [
        "minimind",
        "minimind-v",
        "minimind-imported",
        "minimind-reasoner",
    ]


def test_openai_client_streaming_and_seeded_sampling(server):
    client = openai_client(server)
    chunks = list(
        client.chat.completions.create(
            model="minimind",
            messages=[{"role": "user", "content": "讲个故事"}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            temperature=0.9,
            top_p=0.9,
            seed=7,
        )
    )
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert text and finishes == ["length"] and chunks[-1].usage.completion_tokens == 8
    again = client.chat.completions.create(
        model="minimind", messages=[{"role": "user", "content": "讲个故事"}], max_tokens=8, temperature=0.9, top_p=0.9, seed=7
    )
    assert again.choices[0].message.content == text  # the same seed samples the same reply


def ask_with_tools(client, messages, stream: bool, **extra) -> tuple[str, list[dict], str]:
    """(content, calls as {"id", "name", "arguments"}, finish reason) of one request, streamed or not."""
    request = {"model": "minimind-reasoner", "messages": messages, "tools": TOOLS, "temperature": 0, "max_tokens": 120, **extra}
    if not stream:
        choice = client.chat.completions.create(**request).choices[0]
        calls = [{"id": call.id, "name": call.function.name, "arguments": call.function.arguments}
                 for call in choice.message.tool_calls or []]
        return choice.message.content or "", calls, choice.finish_reason
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(**request, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for part in delta.tool_calls or []:  # id and name first, then the arguments in pieces
            call = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = part.id or call["id"]
            call["name"] += part.function.name or "" if part.function else ""
            call["arguments"] += part.function.arguments or "" if part.function else ""
        finish = chunk.choices[0].finish_reason or finish
    return content, [calls[index] for index in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_tool_call_round_trip_with_the_openai_client(server, stream):
    """The model calls the tool, the client runs it and sends the result back, the model answers with it."""
    client = openai_client(server)
    messages = [*TOOL_QUESTION]
    content, calls, finish = ask_with_tools(client, messages, stream)
    assert (content, [call["name"] for call in calls], finish) == ("", ["add"], "tool_calls")
    assert calls[0]["id"].startswith("call_")
    arguments = json.loads(calls[0]["arguments"])  # the client runs its tool
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": calls[0]["id"], "type": "function", "function": {"name": "add", "arguments": calls[0]["arguments"]}}]},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": str(arguments["a"] + arguments["b"])},
    ]
    assert ask_with_tools(client, messages, stream) == ("等于 5555。", [], "stop")


def test_a_named_tool_choice_forces_its_call_and_a_call_that_does_not_parse_is_content(server):
    client = openai_client(server)
    named = {"type": "function", "function": {"name": "add"}}
    _, calls, finish = ask_with_tools(client, [*TOOL_QUESTION], True, tool_choice=named)  # the call's start is the prompt's
    assert finish == "tool_calls" and [(call["name"], json.loads(call["arguments"])) for call in calls] == [
        ("add", {"a": 1234, "b": 4321})]
    content, calls, finish = ask_with_tools(client, [*TOOL_QUESTION], False, max_tokens=20)  # cut off inside the call
    assert (calls, finish) == ([], "length") and content.startswith("<tool_call>")
    status, body = post(server, {"model": "minimind-reasoner", "messages": TOOL_QUESTION, "tools": TOOLS,
                                 "tool_choice": {"type": "function", "function": {"name": "sub"}}})
    assert status == 400 and body["error"]["param"] == "tool_choice"


def test_a_stop_string_ends_the_reply_before_it(server):
    ask = dict(model="minimind", messages=[{"role": "user", "content": "停在哪里"}], max_tokens=8, temperature=0)
    client = openai_client(server)
    full = client.chat.completions.create(**ask).choices[0].message.content
    assert len(full) >= 4
    # one character: stop strings match the text as generated, and the content does not show the invalid bytes
    # this random model writes between some characters, so two characters adjacent in the content may not be
    stopped = client.chat.completions.create(**ask, stop=[full[2]]).choices[0]
    assert stopped.message.content == full[: full.index(full[2])] and stopped.finish_reason == "stop"


def test_image_request_to_the_vision_model(server):
    content = [{"type": "image_url", "image_url": {"url": png_data_url()}}, {"type": "text", "text": "图中有什么？"}]
    reply = openai_client(server).chat.completions.create(
        model="minimind-v", messages=[{"role": "user", "content": content}], max_tokens=4
    )
    assert reply.usage.prompt_tokens > 16  # the image's 16 placeholder tokens are part of the prompt
    assert reply.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    "body, raw, status, fragment",
    [
        (None, b"{not json", 400, "not valid JSON"),
        ({"model": "minimind"}, None, 400, "'messages'"),
        ({"model": "minimind", "messages": []}, None, 400, "'messages'"),
        ({"model": "minimind", "messages": [{"role": "robot", "content": "hi"}]}, None, 400, "role"),
        ({"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}, None, 404, "does not exist"),
        (hello(max_tokens=100_000), None, 400, "max_tokens"),
        ({"model": "minimind", "messages": [{"role": "user", "content": "你好" * 1200}]}, None, 400, "context window"),
        (hello(temperature="hot"), None, 400, "temperature"),
        (hello(top_p=1.5), None, 400, "top_p"),
        (hello(temperature=-1), None, 400, "temperature"),
        (
            hello(
                "minimind-v",
                messages=[
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}
                ],
            ),
            None,
            400,
            "base64",
        ),
        (
            hello(
                "minimind-v",
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"just some text").decode()},
                            }
                        ],
                    }
                ],
            ),
            None,
            400,
            "not a readable image",
        ),
        (
            hello(
                "minimind-v",
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url((400, 400))}}]}],
            ),
            None,
            413,
            "image",
        ),
        (
            hello(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url()}}]}]),
            None,
            400,
            "does not take images",
        ),
        (
            hello(
                "minimind-v",
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://10.1.2.3/a.png"}}]}],
            ),
            None,
            400,
            "not a public address",
        ),
    ],
)
def test_bad_requests_get_openai_shaped_errors(server, body, raw, status, fragment):
    code, answer = post(server, body, raw=raw)
    assert code == status and fragment in answer["error"]["message"] and answer["error"]["type"]


def send(base, data: bytes = b"", headers: dict | None = None, key: str | None = API_KEY, chunks=None):
    """POST raw bytes (or `chunks`, chunked with no Content-Length) with full control of the headers."""
    import http.client

    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    try:
        connection.request(
            "POST", "/v1/chat/completions", body=iter(chunks) if chunks else data, headers=headers, encode_chunked=bool(chunks)
        )
        response = connection.getresponse()
        return response.status, response.headers, response.read()  # headers: case-insensitive
    finally:
        connection.close()


def body(model="minimind", **extra) -> bytes:
    return json.dumps(hello(model, **extra)).encode()


def with_images(*urls) -> bytes:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls] + [{"type": "text", "text": "图中有什么？"}]
    return body("minimind-v", messages=[{"role": "user", "content": parts}])


def bytes_url(data: bytes, kind="image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def _hostile():
    from test_protocol import EPS, PSD, SVG, image_bytes, png_declaring, with_garbage_exif

    png = image_bytes(size=(64, 64))
    raw = b'{"model": "minimind", "messages": [{"role": "user", "content": %s}]%s}'
    return {
        "declared-body-over-the-limit": (dict(data=b"{}", headers={"Content-Length": str(2**30)}), 413, "larger than"),
        "chunked-body-over-the-limit": (dict(chunks=[b" " * 16384] * 20), 413, "larger than"),
        "sent-body-over-the-limit": (dict(data=body(messages=[{"role": "user", "content": "x" * MAX_BODY}])), 413, "larger than"),
        "huge-message": (dict(data=body(messages=[{"role": "user", "content": "x" * 5000}])), 413, "4000 characters"),
        "huge-messages-in-all": (dict(data=body(messages=[{"role": "user", "content": "x" * 3000}] * 3)), 413, "8000 characters"),
        "too-many-messages": (dict(data=body(messages=[{"role": "user", "content": "x"}] * 65)), 413, "64 messages"),
        "too-many-images": (dict(data=with_images(*[bytes_url(png)] * 5)), 400, "at most 4 images"),
        "image-bomb-30000x30000": (dict(data=with_images(bytes_url(png_declaring(30_000, 30_000)))), 413, "pixels"),
        "eps-image": (dict(data=with_images(bytes_url(EPS, "image/eps"))), 400, "PNG, JPEG, WebP or GIF"),
        "tiff-image": (dict(data=with_images(bytes_url(image_bytes("TIFF"), "image/tiff"))), 400, "PNG, JPEG, WebP or GIF"),
        "svg-image": (dict(data=with_images(bytes_url(SVG, "image/svg+xml"))), 400, "PNG, JPEG, WebP or GIF"),
        "bmp-image": (dict(data=with_images(bytes_url(image_bytes("BMP"), "image/bmp"))), 400, "PNG, JPEG, WebP or GIF"),
        "psd-image": (dict(data=with_images(bytes_url(PSD, "image/vnd.adobe.photoshop"))), 400, "PNG, JPEG, WebP or GIF"),
        "truncated-base64": (dict(data=with_images(bytes_url(png)[:-5])), 400, "base64"),
        "truncated-png": (dict(data=with_images(bytes_url(png[: len(png) // 2]))), 400, "corrupt or truncated"),
        "png-with-garbage-exif": (dict(data=with_images(bytes_url(with_garbage_exif("PNG")))), 400, "corrupt or truncated"),
        "webp-with-garbage-exif": (dict(data=with_images(bytes_url(with_garbage_exif("WEBP"), "image/webp"))), 400, "corrupt"),
        "image-1x20000": (dict(data=with_images(bytes_url(png_declaring(1, 20_000)))), 400, "20 times its short side"),
        "n-2": (dict(data=body(n=2)), 400, "'n' must be 1"),
        "n-negative": (dict(data=body(n=-1)), 400, "'n' must be 1"),
        "header-of-64-kib": (dict(data=body(), headers={"X-Padding": "a" * 65_536}), 431, "headers"),
        "200-headers": (dict(data=body(), headers={f"X-Header-{i}": "1" for i in range(200)}), 431, "headers"),
        "text-plain": (dict(data=body(), headers={"Content-Type": "text/plain"}), 415, "application/json"),
        "form": (
            dict(data=b"model=minimind", headers={"Content-Type": "application/x-www-form-urlencoded"}),
            415,
            "application/json",
        ),
        "multipart": (dict(data=b"--x--", headers={"Content-Type": "multipart/form-data; boundary=x"}), 415, "application/json"),
        "json-array": (dict(data=b"[]"), 400, "JSON object"),
        "json-number": (dict(data=b"42"), 400, "JSON object"),
        "json-null": (dict(data=b"null"), 400, "JSON object"),
        "json-string": (dict(data=b'"hi"'), 400, "JSON object"),
        "empty-body": (dict(data=b""), 400, "not valid JSON"),
        "nested-arrays-100000": (dict(data=b"[" * 100_000 + b"]" * 100_000), 400, "nested too deeply"),
        "nested-objects-20000": (dict(data=b'{"a":' * 20_000 + b"1" + b"}" * 20_000), 400, "nested too deeply"),
        "invalid-utf8": (dict(data=raw % (b'"\xff\xfe"', b"")), 400, "UTF-8"),
        "lone-surrogate": (dict(data=raw % (b'"\\ud800"', b"")), 400, "surrogate"),
        "escaped-nul": (dict(data=raw % (b'"a\\u0000b"', b"")), 400, "NUL"),
        "raw-nul": (dict(data=raw % (b'"a\x00b"', b"")), 400, "not valid JSON"),
        "integer-of-5000-digits": (dict(data=raw % (b'"hi"', b', "max_tokens": ' + b"9" * 5000)), 400, "not valid JSON"),
        "nan-temperature": (dict(data=raw % (b'"hi"', b', "temperature": NaN')), 400, "temperature"),
        "infinite-top-p": (dict(data=raw % (b'"hi"', b', "top_p": 1e999')), 400, "top_p"),
        "negative-max-tokens": (dict(data=body(max_tokens=-1)), 400, "max_tokens"),
        "string-max-tokens": (dict(data=body(max_tokens="5")), 400, "max_tokens"),
        "float-seed": (dict(data=body(seed=1.5)), 400, "seed"),
        "negative-top-k": (dict(data=body(top_k=-1)), 400, "top_k"),
        "zero-repetition-penalty": (dict(data=body(repetition_penalty=0)), 400, "repetition_penalty"),
        "huge-stop-list": (dict(data=body(stop=["x"] * 10_000)), 400, "'stop'"),
        "number-stop": (dict(data=body(stop=5)), 400, "'stop'"),
        "string-stream": (dict(data=body(stream="yes")), 400, "'stream'"),
        "number-model": (dict(data=json.dumps({"model": 5, "messages": []}).encode()), 400, "'model'"),
        "unknown-model": (dict(data=body("../../etc/passwd")), 404, "does not exist"),
        "string-messages": (dict(data=body(messages="hi")), 400, "'messages'"),
        "list-message": (dict(data=body(messages=[["user", "hi"]])), 400, "must be an object"),
        "null-content": (dict(data=body(messages=[{"role": "user", "content": None}])), 400, "content"),
        "string-part": (dict(data=body(messages=[{"role": "user", "content": ["hi"]}])), 400, "text or image_url part"),
        "tool-without-call": (dict(data=body(messages=[{"role": "tool", "content": "hi"}])), 400, "no tool call before it"),
        "number-image-url": (
            dict(data=body("minimind-v", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": 5}]}])),
            400,
            "image_url.url",
        ),
        "remote-loopback": (dict(data=with_images("http://127.0.0.1:8000/v1/models")), 400, "not a public address"),
        "remote-private": (dict(data=with_images("http://10.0.0.1/a.png")), 400, "not a public address"),
        "remote-cloud-metadata": (
            dict(data=with_images("http://169.254.169.254/latest/meta-data/")),
            400,
            "not a public address",
        ),
        "remote-ipv6-loopback": (dict(data=with_images("http://[::1]:8000/a.png")), 400, "not a public address"),
        "remote-localhost": (dict(data=with_images("https://localhost/a.png")), 400, "not a public address"),
        "remote-decimal-loopback": (dict(data=with_images("http://2130706433/a.png")), 400, "not a public address"),
        "file-url": (dict(data=with_images("file:///etc/passwd")), 400, "data:image"),
        "ftp-url": (dict(data=with_images("ftp://example.com/a.png")), 400, "data:image"),
        "wrong-api-key": (dict(data=body(), key="wrong"), 401, "API key"),
        "missing-api-key": (dict(data=body(), key=None), 401, "API key"),
    }


HOSTILE = _hostile()


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_requests_are_refused_in_openai_shape(server, kind):
    request, status, fragment = HOSTILE[kind]
    code, _, answer = send(server, **request)
    error = json.loads(answer)["error"]
    assert code == status and fragment in error["message"] and set(error) == {"message", "type", "param", "code"}, (code, error)


def request(base, method: str, path: str) -> tuple[int, dict, dict]:
    """Any method on any path, the path sent as is (no client-side normalising of "/../")."""
    import http.client

    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        connection.putheader("Authorization", f"Bearer {API_KEY}")
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.headers, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.parametrize(
    "method, path, status, allowed",
    [
        ("GET", "/v1/chat/completions", 405, "POST"),
        ("PUT", "/v1/chat/completions", 405, "POST"),
        ("OPTIONS", "/v1/chat/completions", 405, "POST"),
        ("DELETE", "/v1/models", 405, "GET"),
        ("GET", "/v1/completions", 404, None),
        ("POST", "/v1/completions", 404, None),
        ("GET", "/../etc/passwd", 404, None),
        ("GET", "/openapi.json", 404, None),
    ],
)
def test_paths_and_methods_the_api_does_not_have_get_openai_shaped_errors(server, method, path, status, allowed):
    code, headers, answer = request(server, method, path)
    assert code == status and set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}, answer
    assert headers.get("Allow") == allowed


def test_a_bad_image_fails_its_own_request_only_and_the_replica_applies_the_gateways_pixel_limit(server):
    """What a model replica does with images the gateway would have refused (sent to the replica directly):
    each request's images are decoded before it joins the batch, so a bad one is that request's 400 (413 over
    the app's pixel limit, 100,000 here), never a failure of the requests joining the batch with it."""
    from ray import serve
    from test_protocol import image_bytes, with_garbage_exif

    from minimind.serve.protocol import ChatRequest

    handle = serve.get_deployment_handle("minimind-v", "minimind")
    images = [with_garbage_exif(), image_bytes(size=(400, 400))] + [image_bytes(size=(64, 64))] * 6
    replies = [
        handle.options(stream=True).chat.remote(
            ChatRequest("minimind-v", [{"role": "user", "content": "<image>\n图中有什么？"}], images=[image], max_tokens=3)
        )
        for image in images
    ]
    events = [list(reply) for reply in replies]
    assert [(e[0]["status"], e[0]["body"]["error"]["code"]) for e in events[:2]] == [
        (400, "invalid_image"),
        (413, "image_too_large"),
    ]
    assert "struct" not in events[0][0]["body"]["error"]["message"]  # Pillow's own words stay in the replica
    # each good request is answered whole: sampled from a random model, a reply may end at its stop token early
    assert all(e[0]["type"] == "start" and e[-1]["type"] == "end" and e[-1]["finish_reason"] in ("length", "stop")
               and not any(event["type"] == "error" for event in e) for e in events[2:]), events[2:]


def test_after_the_hostile_requests_a_normal_one_is_answered(server):
    code, _, answer = send(server, body(max_tokens=3))
    assert code == 200 and json.loads(answer)["usage"]["completion_tokens"] == 3


def test_a_full_queue_is_answered_429_with_retry_after(server):
    """minimind-imported takes one request per replica and lets one more wait per gateway: the rest are refused at once."""
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(send(server, body("minimind-imported", max_tokens=40)))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    statuses = sorted(code for code, _, _ in results)
    assert len(results) == 8 and 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}, statuses
    for code, headers, answer in results:
        if code == 429:
            assert headers["Retry-After"] == "1" and json.loads(answer)["error"]["code"] == "overloaded"


def test_a_cancelled_model_request_frees_its_row(server):
    """What the gateway does when a reply runs past request_timeout_s: cancel the model's response; the replica
    stops decoding it at the next step."""
    from ray import serve

    from minimind.serve.protocol import ChatRequest

    handle = serve.get_deployment_handle("minimind", "minimind")
    before = handle.stats.remote().result()["batches"]
    events = handle.options(stream=True).chat.remote(
        ChatRequest("minimind", [{"role": "user", "content": "长一点"}], max_tokens=600)
    )
    assert next(event for event in events if event["type"] == "delta")
    events.cancel()
    deadline = time.monotonic() + 60
    while not ((stats := handle.stats.remote().result())["batches"] > before and not stats["running"]):
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)
    sent, asked = stats["last_batch"][0]
    assert asked == 600 and sent < 600
    assert stats["compiled"]  # the default on a CPU: this one-row reply decoded through the compiled step


def test_healthz_reports_every_models_state_now(server):
    with urllib.request.urlopen(server + "/healthz", timeout=10) as response:
        health = json.loads(response.read())
    assert response.status == 200 and health["status"] == "ok"
    assert list(health["models"]) == ["minimind", "minimind-v", "minimind-imported", "minimind-reasoner"]
    assert health["models"]["minimind-v"]["takes_images"] and not health["models"]["minimind"]["takes_images"]
    assert all(model["ok"] and model["stuck_s"] == 0 for model in health["models"].values())


def test_the_api_key_is_required(server):
    code, answer = post(server, hello(), key=None)
    assert code == 401 and answer["error"]["code"] == "invalid_api_key"
    code, _ = post(server, hello(), key="wrong")
    assert code == 401


def test_sixteen_concurrent_streaming_clients_all_succeed_in_shared_batches(server):
    from ray import serve

    client = openai_client(server)
    results, errors = [None] * 16, []

    def ask(index):
        try:
            stream = client.chat.completions.create(
                model="minimind", messages=[{"role": "user", "content": f"第{index}个问题"}], max_tokens=12, stream=True
            )
            results[index] = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and all(results)
    stats = serve.get_deployment_handle("minimind", "minimind").stats.remote().result()
    assert max(stats["batch_sizes"][-16:]) > 1  # decoded together, not one request at a time


def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    from ray import serve

    handle = serve.get_deployment_handle("minimind", "minimind")
    before = handle.stats.remote().result()["batches"]
    body = json.dumps(
        {"model": "minimind", "messages": [{"role": "user", "content": "长一点"}], "max_tokens": 600, "stream": True}
    )
    request = urllib.request.Request(
        server + "/v1/chat/completions",
        data=body.encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )
    response = urllib.request.urlopen(request, timeout=60)
    while b'"content": "' not in (line := response.readline()) or b'"content": ""' in line:
        assert line  # read up to the first generated text: decoding has started
    response.close()  # and the client is gone
    deadline = time.monotonic() + 60
    while not ((stats := handle.stats.remote().result())["batches"] > before and not stats["running"]):
        assert time.monotonic() < deadline, stats  # the batch ends early: its only row was dropped
        time.sleep(0.2)
    sent, asked = stats["last_batch"][0]
    assert asked == 600 and sent < 600


def test_the_chat_page_in_a_headless_browser(server, tmp_path):
    """The page in the system's Chromium (playwright drives it; it cannot download its own browser here):
    a streamed reply from the text model, a reasoning model's <think> part folded away, an image question.
    Skips without playwright or chromium, except under CI, whose .ci/run installs chromium."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright import sync_api
    except ImportError:
        sync_api = None
    if not (chromium and sync_api):
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            "needs playwright (a dev dependency) and chromium (apt install chromium)"
        )
    Image.new("RGB", (64, 64), (30, 80, 220)).save(tmp_path / "blue.png")
    answer_text = "document.querySelector('.assistant span')?.textContent"
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server + "/")
            page.fill("#key", API_KEY)
            page.dispatch_event("#key", "change")
            page.wait_for_function("document.querySelectorAll('#model option').length === 4", timeout=30_000)
            assert page.is_hidden("#image-label")  # the text model takes no images
            # every state the reply's text goes through, to see that it streams
            page.evaluate("""window.states = []; new MutationObserver(() => {
                const span = document.querySelector('.assistant span'); if (span) window.states.push(span.textContent);
            }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});""")
            page.fill("#prompt", "讲个故事")
            page.click("#send")
            page.wait_for_function(
                "!document.querySelector('#send').disabled && document.querySelector('.assistant span')", timeout=60_000
            )
            states = [text for text in page.evaluate("window.states") if text]
            assert len(set(states)) > 3 and all(b.startswith(a) for a, b in zip(states, states[1:]))  # it grew in pieces
            assert "\ufffd" not in page.evaluate(answer_text)

            page.select_option("#model", "minimind-reasoner")
            page.fill("#prompt", "你好")
            page.click("#send")
            page.wait_for_function(
                "!document.querySelector('#send').disabled && document.querySelector('.assistant span')?.textContent",
                timeout=60_000,
            )
            assert page.evaluate(answer_text) == "你好！很高兴见到你。"
            fold = page.locator(".assistant details")
            assert fold.is_visible() and fold.get_attribute("open") is None  # folded: only its summary shows
            assert not page.locator(".assistant details div").is_visible()
            assert page.locator(".assistant details div").text_content() == "先想一想。"
            fold.locator("summary").click()
            assert page.locator(".assistant details div").is_visible()

            page.select_option("#model", "minimind")  # a new conversation: changing the model clears it
            page.select_option("#model", "minimind-reasoner")
            page.check("#tools")  # the demo's tools: the page runs the call, folds it away, and the model answers
            page.fill("#temperature", "0")  # greedy: a memorised reply is only the likeliest one, sampling may leave it
            page.fill("#prompt", TOOL_QUESTION[0]["content"])
            page.click("#send")
            page.wait_for_function(
                "!document.querySelector('#send').disabled && document.querySelectorAll('.assistant').length", timeout=60_000
            )
            assert page.locator(".assistant").count() == 2  # the call, then the answer
            call = page.locator(".assistant details.tool")
            assert call.count() == 1 and call.get_attribute("open") is None
            assert call.locator("summary").text_content() == "tool: add"
            assert call.locator("div").text_content() == 'add({"a": 1234, "b": 4321}) → 5555'
            assert page.evaluate("[...document.querySelectorAll('.assistant span')].at(-1).textContent") == "等于 5555。"
            page.uncheck("#tools")

            page.select_option("#model", "minimind-v")
            assert page.is_visible("#image-label")
            page.set_input_files("#image", str(tmp_path / "blue.png"))
            page.wait_for_function("!document.querySelector('#preview').hidden")
            page.fill("#prompt", "图中有什么颜色？")
            page.click("#send")
            page.wait_for_function(f"{answer_text}?.length > 0", timeout=60_000)
            assert page.locator(".error").count() == 0
        finally:
            browser.close()


def test_a_replica_killed_under_load_is_replaced(server):
    """Requests in flight may fail; new ones succeed once Serve has started a new replica. Prints the gap."""
    import ray

    (replica,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if "minimind#minimind#" in a["name"]]
    outcomes, stop = [], threading.Event()

    def load():
        while not stop.is_set():
            started = time.monotonic()
            try:
                status, _ = post(server, hello(max_tokens=3))
            except OSError:  # connection reset while the replica died
                status = None
            outcomes.append((started, time.monotonic(), status))

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(1)
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    deadline = killed_at + 120
    while not any(start > killed_at and status == 200 for start, _, status in outcomes):
        assert time.monotonic() < deadline, outcomes[-5:]
        time.sleep(0.2)
    stop.set()
    for worker in workers:
        worker.join(timeout=60)
    recovered = min(end for start, end, status in outcomes if start > killed_at and status == 200)
    failed = sum(1 for start, end, status in outcomes if end > killed_at and status != 200)
    print(
        f"\nreplica killed: first success after the kill {recovered - killed_at:.1f}s later; {failed} requests failed meanwhile"
    )
    assert all(status in (200, 500, 502, 503, 504, None) for *_, status in outcomes)


def test_the_server_still_answers_after_all_of_that(server):
    assert post(server, hello())[0] == 200
    assert b"<title>MiniMind</title>" in urllib.request.urlopen(server + "/", timeout=10).read()


def test_the_serve_job_flags_become_settings(server):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    from serve import parse, settings_from

    settings = settings_from(
        parse(
            [
                "--no-vision",
                "--api-key-file",
                "/run/secrets/k",
                "--replicas",
                "auto",
                "--max-tokens",
                "64",
                "--gateway-replicas",
                "2",
                "--request-timeout-s",
                "30",
                "--max-queued-requests",
                "7",
                "--max-body-bytes",
                "1000",
                "--max-message-chars",
                "99",
                "--allow-remote-images",
            ]
        )
    )
    assert [(m.name, m.uri, m.num_replicas, m.num_gpus) for m in settings.models] == [
        ("minimind", "models:/minimind-reason/latest", "auto", 0.0)
    ]
    assert (
        settings.api_key_file == "/run/secrets/k"
        and settings.limits.max_tokens == 64
        and settings.tracking_uri.startswith("sqlite:")
    )
    assert (settings.gateway_replicas, settings.request_timeout_s, settings.models[0].max_queued_requests) == (2, 30, 7)
    assert (settings.limits.max_body_bytes, settings.limits.max_message_chars, settings.limits.allow_remote_images) == (
        1000,
        99,
        True,
    )
    # the defaults fit the machine: two model replicas and the gateway on this 2-CPU Ray instance
    models = settings_from(parse([])).models
    assert len(models) == 2 and sum(m.num_cpus for m in models) + 0.1 <= 2 and all(m.num_cpus > 0.9 for m in models)


def test_a_public_address_without_an_api_key_is_warned_about(server, capsys, monkeypatch, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    from serve import parse, settings_from

    monkeypatch.delenv("MINIMIND_API_KEY", raising=False)
    settings_from(parse(["--no-vision", "--host", "0.0.0.0"]))
    assert "without an API key" in capsys.readouterr().err
    monkeypatch.setenv("MINIMIND_API_KEY", "k")
    settings_from(parse(["--no-vision", "--host", "0.0.0.0"]))
    settings_from(parse(["--no-vision"]))  # loopback: no warning either way
    assert capsys.readouterr().err == ""


def test_an_app_the_cluster_cannot_hold_is_named_resource_by_resource():
    import sys
    from pathlib import Path

    from minimind.serve.app import ModelSpec, ServeSettings

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    from serve import shortfall

    gpu = ServeSettings(models=[ModelSpec("minimind", "x", num_cpus=0.5, num_gpus=1), ModelSpec("minimind-v", "y", num_cpus=0.5)])
    assert shortfall(gpu, {"CPU": 2}, [{"CPU": 2}]) == "minimind needs 1 GPU per replica x 1: 1 GPU in all; the cluster has 0"
    assert shortfall(gpu, {"CPU": 2, "GPU": 1}, [{"CPU": 2, "GPU": 1}]) is None
    wide = ServeSettings(models=[ModelSpec("minimind", "x", num_cpus=3, num_replicas=2)])
    assert shortfall(wide, {"CPU": 4}, [{"CPU": 2}, {"CPU": 2}]) == (
        "Gateway needs 0.1 CPU per replica x 1, minimind needs 3 CPU per replica x 2: 6.1 CPU in all; the cluster has 4"
    )
    assert shortfall(wide, {"CPU": 8}, [{"CPU": 2}] * 4) == "minimind needs 3 CPU per replica; the largest node has 2"


def test_the_serve_job_refuses_at_once_what_the_cluster_cannot_place(server):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    from serve import main

    started = time.monotonic()
    with pytest.raises(SystemExit, match="minimind needs 1 GPU per replica x 1: 1 GPU in all; the cluster has 0"):
        main(["--no-vision", "--num-gpus", "1", "--num-cpus", "0.1"])
    assert time.monotonic() - started < 10


def test_an_app_still_unplaced_at_its_deadline_is_deleted_with_the_reason(server):
    """--wait-for-nodes skips the check against the nodes up now; by the placement timeout it fails all the same."""
    import sys
    from pathlib import Path

    from ray import serve

    from minimind.serve.app import ModelSpec, ServeSettings, build

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    from serve import deploy

    settings = ServeSettings(
        models=[ModelSpec("minimind", "models:/minimind-reason/latest", num_cpus=0.1, num_gpus=1)], api_key_env=None
    )
    started = time.monotonic()
    with pytest.raises(SystemExit, match="could not be placed within 2 s: minimind needs 1 GPU"):
        deploy(build(settings), settings, 2, name="unplaceable", route_prefix="/unplaceable")
    assert time.monotonic() - started < 15
    while (
        getattr(serve.status().applications.get("unplaceable"), "status", "DELETING") != "DELETING"
    ):  # deleted, in the background
        assert time.monotonic() - started < 30
        time.sleep(0.2)
    import ray

    for actor in ray.util.list_named_actors(all_namespaces=True):  # Serve would wait 20 s for the unplaced replica's
        if "unplaceable#minimind#" in actor["name"]:  # graceful shutdown; spare the teardown that wait
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)


class FakeReply:
    """A model's streaming response as the gateway sees it: events, then nothing for `stall_s`, or an error."""

    def __init__(self, events=(), stall_s=0.0, error=None):
        self.events, self.stall_s, self.error, self.cancelled = list(events), stall_s, error, False

    async def __anext__(self):
        if self.events:
            return self.events.pop(0)
        if self.error:
            raise self.error
        await asyncio.sleep(self.stall_s)
        raise StopAsyncIteration

    def cancel(self):
        self.cancelled = True


def test_the_gateway_ends_late_replies_with_504_and_full_queues_with_429():
    from ray.serve.exceptions import BackPressureError

    from minimind.serve.app import _next_event
    from minimind.serve.errors import APIError

    async def outcome(reply, timeout_s=0.05):
        try:
            return await _next_event(reply, asyncio.get_running_loop().time() + timeout_s, "minimind", timeout_s)
        except APIError as error:
            return error

    late = FakeReply(stall_s=10)
    error = asyncio.run(outcome(late))
    assert error.status == 504 and error.code == "timeout" and late.cancelled  # the replica frees the row
    full = FakeReply(error=BackPressureError(num_queued_requests=1, max_queued_requests=1, status_code=429, retry_after_s=1))
    error = asyncio.run(outcome(full))
    assert (error.status, error.headers, error.code) == (429, {"Retry-After": "1"}, "overloaded")
    dead = FakeReply(error=RuntimeError("actor died"))
    error = asyncio.run(outcome(dead))
    assert error.status == 503 and dead.cancelled and "actor died" not in error.message
    from ray.exceptions import RayTaskError

    failed = FakeReply(error=RayTaskError("chat", "Traceback ... ValueError: secret detail", ValueError("secret detail")))
    error = asyncio.run(outcome(failed))
    assert error.status == 503 and failed.cancelled and "Error" not in error.message and "secret" not in error.message, (
        error.message
    )
    assert asyncio.run(outcome(FakeReply(events=[{"type": "start"}]))) == {"type": "start"}


def test_a_stream_past_its_deadline_ends_with_an_error_event():
    from types import SimpleNamespace

    from minimind.serve.app import Gateway
    from minimind.serve.protocol import ChatRequest

    gateway = SimpleNamespace(request_timeout_s=0.05)  # what _sse reads of its replica
    reply = FakeReply(events=[{"type": "delta", "reasoning": "", "content": "你"}], stall_s=10)

    async def run():
        deadline = asyncio.get_running_loop().time() + 0.05
        sse = Gateway.func_or_class._sse(gateway, ChatRequest("minimind", []), {"prompt_tokens": 1}, reply, deadline)
        return [chunk async for chunk in sse]

    chunks = asyncio.run(run())
    assert '"content": "你"' in chunks[1] and json.loads(chunks[-1].removeprefix("data: "))["error"]["code"] == "timeout"
    assert reply.cancelled and "[DONE]" not in chunks[-1]


def test_the_gateway_reads_a_body_only_up_to_its_limit():
    from starlette.requests import Request

    from minimind.serve.app import _read_body
    from minimind.serve.errors import APIError

    received = []

    async def endless():  # a client that never stops sending
        received.append(1)
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}

    async def outcome(headers):
        try:
            return await _read_body(Request({"type": "http", "method": "POST", "headers": headers}, endless), 10_000)
        except APIError as error:
            return error

    assert asyncio.run(outcome([(b"content-length", b"1000000")])).status == 413 and received == []  # refused unread
    assert asyncio.run(outcome([])).status == 413 and len(received) == 11  # counted while streaming: stops past the limit


def test_a_replica_keeps_no_downloaded_model_on_disk(server, tmp_path):
    """A models:/ URI is downloaded to a temporary folder that is gone once the replica has loaded it
    (one folder per replica start was left in /tmp before)."""
    import ray

    from minimind.serve.app import ModelServer, ModelSpec
    from minimind.serve.protocol import Limits

    @ray.remote(num_cpus=0.1, max_calls=1)  # a worker of its own: its tempfile.tempdir must not outlive the test
    def start_replica(scratch: str, tracking_uri: str) -> tuple[dict, list]:
        import tempfile

        tempfile.tempdir = scratch
        replica = ModelServer.func_or_class(
            asdict(ModelSpec("m", "models:/minimind-reason/latest")), asdict(Limits()), tracking_uri
        )
        return replica.info(), os.listdir(scratch)

    info, left = ray.get(start_replica.remote(str(tmp_path), os.environ["MLFLOW_TRACKING_URI"]), timeout=120)
    assert [name for name in left if not name.startswith("torchinductor_")] == []  # inductor's compile cache stays, by design
    assert info == {"takes_images": False, "context": 1024, "source": "models:/minimind-reason/latest"}
