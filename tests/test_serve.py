"""The real Ray Serve app on small random models from a temporary MLflow registry: the official
`openai` client, streaming, images, every bad input, concurrency and a disconnecting client."""

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

API_KEY = "test-key"


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
    from ray import serve

    from conftest import random_model
    from minimind import tracking
    from minimind.checkpoint import save_model
    from minimind.demo import demo_tokenizer, demo_vision_tower
    from minimind.serve.app import ModelSpec, ServeSettings, build
    from minimind.serve.protocol import Limits
    from minimind.tokenizer import load_tokenizer
    from minimind.vision import build_vlm, save_vlm

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
    from minimind.importer import import_model
    from test_importer import chatml_tokenizer

    chatml = chatml_tokenizer()
    chatml.save_pretrained(str(home / "chatml"))
    brought = random_model("tiny", vocab_size=len(chatml))
    with torch.no_grad():
        brought.model.embed_tokens.weight[:3] = 0  # its special tokens never win: the reply runs to max_tokens
    torch.save({k: v.half() for k, v in brought.state_dict().items()}, home / "full_sft_512.pth")
    import_model(home / "full_sft_512.pth", home / "imported", home / "chatml", {"num_attention_heads": 4})

    port = free_port()
    models = [ModelSpec("minimind", "models:/minimind-reason/latest", num_cpus=0.5, batch_wait_ms=20),
              ModelSpec("minimind-v", "models:/minimind-vlm-sft/latest", num_cpus=0.5),
              ModelSpec("minimind-imported", str(home / "imported"), num_cpus=0.25)]
    limits = Limits(max_tokens=600, max_image_pixels=100_000)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    (home / "api-key").write_text(API_KEY + "\n")  # a mounted secret, read inside the gateway's replica
    settings = ServeSettings(models=models, limits=limits, api_key_file=str(home / "api-key"), api_key_env=None,
                             tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
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
    reply = openai_client(server).chat.completions.create(model="minimind-imported", messages=[{"role": "user", "content": "你好"}],
                                                          max_tokens=4)
    assert reply.model == "minimind-imported" and reply.usage.completion_tokens == 4 and reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content


def test_openai_client_non_streaming(server):
    reply = openai_client(server).chat.completions.create(model="minimind", messages=[{"role": "user", "content": "你好"}], max_tokens=6)
    assert reply.object == "chat.completion" and reply.model == "minimind"
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "length"  # the test model never says its end-of-turn token
    assert reply.usage.completion_tokens == 6 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 6
    assert [m.id for m in openai_client(server).models.list().data] == ["minimind", "minimind-v", "minimind-imported"]


def test_openai_client_streaming_and_seeded_sampling(server):
    client = openai_client(server)
    chunks = list(client.chat.completions.create(model="minimind", messages=[{"role": "user", "content": "讲个故事"}], max_tokens=8,
                                                 stream=True, stream_options={"include_usage": True}, temperature=0.9, top_p=0.9, seed=7))
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert text and finishes == ["length"] and chunks[-1].usage.completion_tokens == 8
    again = client.chat.completions.create(model="minimind", messages=[{"role": "user", "content": "讲个故事"}], max_tokens=8,
                                           temperature=0.9, top_p=0.9, seed=7)
    assert again.choices[0].message.content == text  # the same seed samples the same reply


def test_a_stop_string_ends_the_reply_before_it(server):
    ask = dict(model="minimind", messages=[{"role": "user", "content": "停在哪里"}], max_tokens=8, temperature=0)
    client = openai_client(server)
    full = client.chat.completions.create(**ask).choices[0].message.content
    assert len(full) >= 4
    stopped = client.chat.completions.create(**ask, stop=[full[2:4]]).choices[0]
    assert stopped.message.content == full[: full.index(full[2:4])] and stopped.finish_reason == "stop"


def test_image_request_to_the_vision_model(server):
    content = [{"type": "image_url", "image_url": {"url": png_data_url()}}, {"type": "text", "text": "图中有什么？"}]
    reply = openai_client(server).chat.completions.create(model="minimind-v", messages=[{"role": "user", "content": content}], max_tokens=4)
    assert reply.usage.prompt_tokens > 16  # the image's 16 placeholder tokens are part of the prompt
    assert reply.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body, raw, status, fragment", [
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
    (hello("minimind-v", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]),
     None, 400, "base64"),
    (hello("minimind-v", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"just some text").decode()}}]}]), None, 400, "not a readable image"),
    (hello("minimind-v", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url((400, 400))}}]}]),
     None, 413, "image"),
    (hello(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url()}}]}]), None, 400, "does not take images"),
    (hello("minimind-v", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]),
     None, 400, "remote image URLs are disabled"),
])
def test_bad_requests_get_openai_shaped_errors(server, body, raw, status, fragment):
    code, answer = post(server, body, raw=raw)
    assert code == status and fragment in answer["error"]["message"] and answer["error"]["type"]


def test_healthz_reports_every_models_state_now(server):
    with urllib.request.urlopen(server + "/healthz", timeout=10) as response:
        health = json.loads(response.read())
    assert response.status == 200 and health["status"] == "ok"
    assert list(health["models"]) == ["minimind", "minimind-v", "minimind-imported"]
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
            stream = client.chat.completions.create(model="minimind", messages=[{"role": "user", "content": f"第{index}个问题"}],
                                                    max_tokens=12, stream=True)
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
    body = json.dumps({"model": "minimind", "messages": [{"role": "user", "content": "长一点"}], "max_tokens": 600, "stream": True})
    request = urllib.request.Request(server + "/v1/chat/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
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
    """Skips cleanly without playwright or a Chromium (Debian: apt install chromium)."""
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("no chromium on PATH")
    Image.new("RGB", (64, 64), (30, 80, 220)).save(tmp_path / "blue.png")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server + "/")
            page.fill("#key", API_KEY)
            page.dispatch_event("#key", "change")
            page.wait_for_function("document.querySelectorAll('#model option').length === 2", timeout=30_000)
            assert page.is_hidden("#image-label")  # the text model takes no images
            page.fill("#prompt", "你好")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.assistant span')[0]?.textContent.length > 0", timeout=60_000)
            page.select_option("#model", "minimind-v")
            assert page.is_visible("#image-label")
            page.set_input_files("#image", str(tmp_path / "blue.png"))
            page.wait_for_function("!document.querySelector('#preview').hidden")
            page.fill("#prompt", "图中有什么颜色？")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.assistant span')[0]?.textContent.length > 0", timeout=60_000)
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
    print(f"\nreplica killed: first success after the kill {recovered - killed_at:.1f}s later; {failed} requests failed meanwhile")
    assert all(status in (200, 500, 502, 503, 504, None) for *_, status in outcomes)


def test_the_server_still_answers_after_all_of_that(server):
    assert post(server, hello())[0] == 200
    assert b"<title>MiniMind</title>" in urllib.request.urlopen(server + "/", timeout=10).read()


def test_the_serve_job_flags_become_settings(server):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    from serve import parse, settings_from

    settings = settings_from(parse(["--no-vision", "--api-key-file", "/run/secrets/k", "--replicas", "auto", "--max-tokens", "64"]))
    assert [(m.name, m.uri, m.num_replicas, m.num_gpus) for m in settings.models] == [("minimind", "models:/minimind-reason/latest", "auto", 0.0)]
    assert settings.api_key_file == "/run/secrets/k" and settings.limits.max_tokens == 64 and settings.tracking_uri.startswith("sqlite:")
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
