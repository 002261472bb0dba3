"""The Ray Serve application: one deployment per model (`ModelServer`, batching inside each replica)
behind a FastAPI gateway that speaks OpenAI's chat-completions API and serves the chat page.

    POST /v1/chat/completions   GET /v1/models   GET /healthz   GET /  (chat page)

Every refusal is in OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`, also that of a
path the API does not have (404) or a method a path does not take (405). A request's headers are bounded
before any route sees them (`MAX_HEADERS`, `MAX_HEADER_BYTES`: 431). The gateway's event loop only moves
bytes: the body is read up to `Limits.max_body_bytes`, and JSON, base64 and image decoding (and remote
fetches) run on a small thread pool. Each model deployment holds at most `max_queued_requests` waiting
requests per gateway replica (more: 429 with `Retry-After`), and a reply must come within
`request_timeout_s` (else 504, and its replica stops decoding it).
`build_app(args)` is the application builder `serve run` and `jobs/serve.py` use.
"""


import asyncio
import hmac
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from minimind.serve.errors import APIError
from minimind.serve.protocol import ChatRequest, Limits, completion_id, now, parse_chat_body

PAGE = Path(__file__).with_name("chat.html")
DEMO_TOOLS = Path(__file__).parents[1] / "demo" / "tools.json"  # read as a file: the demo package would load torch
logger = logging.getLogger("ray.serve")
GATEWAY_CPUS = 0.1  # per gateway replica: it parses and forwards, the model replicas compute
# A request's headers, names and values together (uvicorn's h11 parser stops at 16 KiB, nginx at 4 x 8 KiB;
# Serve's proxy parses with httptools, which has no limit): room for an API key and a browser's cookies.
MAX_HEADER_BYTES = 32 * 1024
MAX_HEADERS = 100


@dataclass
class ModelSpec:
    name: str  # the OpenAI model name clients ask for, and the name of its Serve deployment
    uri: str  # models:/NAME/latest|VERSION, models:/NAME@ALIAS, runs:/... or a directory
    num_replicas: int | str = 1  # or "auto" for autoscaling
    max_replicas: int = 2
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_batch_size: int = 16
    batch_wait_ms: float = 10.0
    dtype: str = "bf16"
    compile: str = "auto"  # the decoding step: auto compiles one-row steps on a CPU (minimind.inference.generate)
    stuck_after_s: float = 120.0  # a decode loop without a finished step for this long fails the health check
    max_ongoing_requests: int | None = None  # per replica; None: 4 x max_batch_size (the rest wait in the replica)
    max_queued_requests: int = 256  # waiting for a replica, per gateway replica; more are refused with 429


# What a model replica is built from; the rest (replicas, resources, queue sizes) are deployment options
# that a Serve config's `deployments:` section may change without restarting the replicas.
REPLICA_FIELDS = ("name", "uri", "max_batch_size", "batch_wait_ms", "dtype", "compile", "stuck_after_s")


@dataclass
class ServeSettings:
    models: list[ModelSpec] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)
    # where the gateway reads its API key: a file (e.g. a mounted secret) or an environment variable of its
    # replica's node. Names only: the key itself never travels in a deployment argument, `serve config` or a log.
    api_key_file: str | None = None
    api_key_env: str | None = "MINIMIND_API_KEY"
    tracking_uri: str | None = None  # where models:/ URIs resolve (default: the project's store)
    gateway_replicas: int = 1
    request_timeout_s: float = 120.0  # from the request's arrival to its reply's last token; else 504


@serve.deployment
class ModelServer:
    """One model in one replica; concurrent requests decode together (see minimind.serve.engine)."""

    def __init__(self, spec: dict, limits: dict, tracking_uri: str | None):
        import ray
        import torch

        # the model replica's own: the gateway's replicas, which import this module too, need neither torch nor MLflow
        from minimind import tracking
        from minimind.serve.engine import ChatModel

        spec = ModelSpec(**spec)
        if tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        tracking.configure()
        self.source = spec.uri
        with tracking.resolved_model(spec.uri) as model_dir:  # everything is in memory once loaded: nothing left on disk
            self.chat_model = ChatModel(
                model_dir, Limits(**limits), spec.max_batch_size, spec.batch_wait_ms / 1000, spec.dtype, compile=spec.compile
            )
        self.stuck_after_s = spec.stuck_after_s

    def check_health(self) -> None:
        """Serve calls this every few seconds; raising marks the replica unhealthy and Serve replaces it."""
        stuck = self.chat_model.engine.stuck_for()
        if stuck > self.stuck_after_s:
            raise RuntimeError(f"the decode loop has finished no step for {stuck:.0f} s")

    def health(self) -> dict:
        engine = self.chat_model.engine
        return {"takes_images": self.chat_model.takes_images, "decoding": engine.running, "waiting": len(engine.pending),
                "stuck_s": round(engine.stuck_for(), 1), "ok": engine.stuck_for() <= self.stuck_after_s}

    def info(self) -> dict:
        return {"takes_images": self.chat_model.takes_images, "context": self.chat_model.context, "source": self.source}

    def stats(self) -> dict:
        engine = self.chat_model.engine
        return {"batches": engine.batches_run, "batch_sizes": engine.batch_sizes[-50:], "waiting": len(engine.pending),
                "last_batch": engine.last_batch, "running": engine.running,
                "compiled": hasattr(self.chat_model.model, "compiled_decode_step")}

    async def chat(self, request: ChatRequest):
        try:  # each event crosses to the gateway as a Ray item: deltas are merged when many rows decode at once
            async for event in self.chat_model.paced_chat(request):
                yield event
        except APIError as error:
            yield {"type": "error", "status": error.status, "body": error.body()}


def read_api_key(api_key_file: str | None, api_key_env: str | None) -> str | None:
    """The API key from the file (first line) if one is named, else from the environment variable; None: no key."""
    if api_key_file:
        try:
            return Path(api_key_file).read_text(encoding="utf-8").strip() or None
        except OSError as error:
            raise RuntimeError(f"the API key file {api_key_file} cannot be read: {error.strerror}") from None
    return (os.environ.get(api_key_env) or None) if api_key_env else None


api = FastAPI(title="MiniMind", docs_url=None, redoc_url=None, openapi_url=None)
# Note: serve.ingress captures the gateway class when it is defined, so what its methods use is defined above it.


def _tool_call(call: dict) -> dict:
    """A call the model made, as OpenAI returns it (arguments as JSON text)."""
    return {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}


def _usage(start: dict, end: dict) -> dict:
    prompt, completion = start.get("prompt_tokens", 0), end.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _error(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


@api.exception_handler(StarletteHTTPException)
async def _routing_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """What FastAPI answers itself (an unknown path: 404; a method the path does not take: 405), in the same
    OpenAI error shape as every other refusal (OpenAI says "Invalid URL (GET /v1/x)")."""
    where = f"{request.method} {request.url.path}"[:200]  # the client's own path, cut short
    message = f"Invalid URL ({where})" if error.status_code == 404 else f"{where}: {error.detail}"
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
    return _error(APIError(error.status_code, message, code=code, headers=dict(error.headers or {})))


class BoundedHeaders:
    """ASGI middleware in front of every route: a request with more than MAX_HEADERS headers, or more than
    MAX_HEADER_BYTES of them, is answered 431 before any route, body read or model sees it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = scope["headers"]
            if len(headers) > MAX_HEADERS or sum(len(name) + len(value) for name, value in headers) > MAX_HEADER_BYTES:
                error = APIError(431, f"the request's headers are over the limit: at most {MAX_HEADERS} headers of "
                                 f"{MAX_HEADER_BYTES} bytes in all", code="headers_too_large")
                return await _error(error)(scope, receive, send)
        return await self.app(scope, receive, send)


api.add_middleware(BoundedHeaders)


def _check_content_type(request: Request) -> None:
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if kind != "application/json" and not kind.endswith("+json"):
        raise APIError(415, f"the body must be JSON: send 'Content-Type: application/json', not {kind[:60]!r}",
                       code="unsupported_media_type")


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be over `max_bytes` (announced or counted)."""
    too_large = APIError(413, f"the request body is larger than {max_bytes} bytes", code="request_too_large")
    try:
        announced = int(request.headers.get("content-length", 0))
    except ValueError:
        raise APIError(400, "the Content-Length header is not a number") from None
    if announced > max_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _next_event(events, deadline: float, model: str, timeout_s: float) -> dict | None:
    """The next event of a model's reply (None at its end). A reply that does not come by the deadline,
    or cannot come, ends in an APIError, and the request is cancelled: its replica frees its batch row."""
    try:
        return await asyncio.wait_for(events.__anext__(), max(0.0, deadline - asyncio.get_running_loop().time()))
    except StopAsyncIteration:
        return None
    except TimeoutError:
        events.cancel()
        raise APIError(504, f"the model '{model}' did not finish the reply within {timeout_s:g} s", kind="server_error",
                       code="timeout") from None
    except BackPressureError as error:
        retry = str(max(1, math.ceil(error.retry_after_s or 1)))
        raise APIError(error.status_code, f"the model '{model}' has too many requests waiting; retry in {retry} s",
                       kind="server_error", code="overloaded", headers={"Retry-After": retry}) from None
    except Exception as error:  # noqa: BLE001 - the replica died, failed, or could not be reached
        events.cancel()
        # what went wrong inside (e.g. "RayTaskError(ValueError)" and its traceback) is for the operator's log only
        logger.warning("the model %r failed a request: %r", model, error)
        raise APIError(503, f"the model '{model}' is unavailable or failed to answer", kind="server_error") from None


@serve.deployment
@serve.ingress(api)
class Gateway:
    def __init__(self, servers: dict, limits: dict, api_key_file: str | None, api_key_env: str | None,
                 request_timeout_s: float = 120.0):
        self.servers, self.limits, self.request_timeout_s = servers, Limits(**limits), request_timeout_s
        key = read_api_key(api_key_file, api_key_env)
        self.expected_authorization = f"Bearer {key}".encode() if key else None
        self.takes_images: dict[str, bool] | None = None
        self.created = now()
        # the page offers the demo world's tools, whose definitions it runs in the browser
        self.page_html = PAGE.read_text(encoding="utf-8").replace("/*DEMO_TOOLS*/[]", DEMO_TOOLS.read_text(encoding="utf-8"))
        # JSON, base64 and Pillow work off the event loop; a few threads bound the memory decoded images take
        self.parsers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="parse-request")

    async def _models(self) -> dict[str, bool]:
        if self.takes_images is None:
            try:
                infos = await asyncio.gather(*(handle.info.remote() for handle in self.servers.values()))
            except Exception:  # noqa: BLE001 - a model replica that is not up yet
                logger.warning("a model replica did not answer", exc_info=True)
                raise APIError(503, "the models are not ready", kind="server_error") from None
            self.takes_images = {name: info["takes_images"] for name, info in zip(self.servers, infos)}
        return self.takes_images

    def _check_key(self, request: Request) -> None:
        sent = request.headers.get("authorization", "").encode()
        if self.expected_authorization and not hmac.compare_digest(sent, self.expected_authorization):  # constant time
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    @api.get("/healthz")
    async def healthz(self):
        """Each model's state now (not a cached first answer): 200 when all answer in time and none is stuck, else 503."""

        async def state(handle) -> dict:
            try:
                return await asyncio.wait_for(handle.health.remote(), timeout=5)
            except Exception as error:  # noqa: BLE001 - unreachable, dead or too slow: reported, not raised
                return {"ok": False, "error": type(error).__name__}

        states = dict(zip(self.servers, await asyncio.gather(*(state(handle) for handle in self.servers.values()))))
        healthy = all(model["ok"] for model in states.values())
        return JSONResponse({"status": "ok" if healthy else "degraded", "models": states}, status_code=200 if healthy else 503)

    @api.get("/", response_class=HTMLResponse)
    async def page(self):
        return self.page_html

    @api.get("/v1/models")
    async def list_models(self, request: Request):
        try:
            self._check_key(request)
            models = await self._models()
        except APIError as error:
            return _error(error)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "minimind", "takes_images": images}
            for name, images in models.items()
        ]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout_s
        try:
            self._check_key(request)
            _check_content_type(request)
            try:
                raw = await asyncio.wait_for(_read_body(request, self.limits.max_body_bytes), self.request_timeout_s)
            except TimeoutError:
                raise APIError(408, f"the request body did not arrive within {self.request_timeout_s:g} s") from None
            chat = await loop.run_in_executor(self.parsers, parse_chat_body, raw, await self._models(), self.limits)
            events = self.servers[chat.model].options(stream=True).chat.remote(chat)
            first = await _next_event(events, deadline, chat.model, self.request_timeout_s)
        except APIError as error:
            return _error(error)
        if first is None or first["type"] == "error":
            return JSONResponse(first["body"], status_code=first["status"]) if first else _error(
                APIError(503, f"the model '{chat.model}' sent no reply", kind="server_error"))
        if chat.stream:
            return StreamingResponse(self._sse(chat, first, events, deadline), media_type="text/event-stream")
        reasoning, content, calls, end = "", "", [], {}
        try:
            while (event := await _next_event(events, deadline, chat.model, self.request_timeout_s)) is not None:
                if event["type"] == "delta":
                    reasoning, content = reasoning + event["reasoning"], content + event["content"]
                elif event["type"] == "tool_calls":
                    calls = [_tool_call(call) for call in event["calls"]]
                elif event["type"] == "end":
                    end = event
                elif event["type"] == "error":
                    return JSONResponse(event["body"], status_code=event["status"])
        except APIError as error:
            return _error(error)
        message = {"role": "assistant", "content": content or (None if calls else ""),
                   **({"reasoning_content": reasoning} if reasoning else {}), **({"tool_calls": calls} if calls else {})}
        return {
            "id": completion_id(), "object": "chat.completion", "created": now(), "model": chat.model,
            "choices": [{"index": 0, "message": message, "finish_reason": end.get("finish_reason", "stop")}],
            "usage": _usage(first, end),
        }

    async def _sse(self, chat: ChatRequest, first: dict, events, deadline: float):
        identity = {"id": completion_id(), "object": "chat.completion.chunk", "created": now(), "model": chat.model}

        def chunk(delta: dict, finish=None, **extra) -> str:
            return (
                "data: "
                + json.dumps(
                    {**identity, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}, ensure_ascii=False
                )
                + "\n\n"
            )

        yield chunk({"role": "assistant", "content": ""})
        try:
            while (event := await _next_event(events, deadline, chat.model, self.request_timeout_s)) is not None:
                if event["type"] == "delta":
                    delta = {
                        key: value
                        for key, value in (("reasoning_content", event["reasoning"]), ("content", event["content"]))
                        if value
                    }
                    yield chunk(delta)
                elif event["type"] == "tool_calls":  # as OpenAI streams them: id and name, then the arguments
                    for index, call in enumerate(event["calls"]):
                        named = {**_tool_call(call), "function": {"name": call["name"], "arguments": ""}}
                        yield chunk({"tool_calls": [{"index": index, **named}]})
                        yield chunk({"tool_calls": [{"index": index, "function": {"arguments": call["arguments"]}}]})
                elif event["type"] == "end":
                    yield chunk({}, event["finish_reason"])
                    if chat.include_usage:
                        yield "data: " + json.dumps({**identity, "choices": [], "usage": _usage(first, event)}) + "\n\n"
                elif event["type"] == "error":
                    yield "data: " + json.dumps(event["body"]) + "\n\n"
                    return
        except APIError as error:  # too late for a status code: OpenAI's clients raise on an error event
            yield "data: " + json.dumps(error.body()) + "\n\n"
            return
        except BaseException:  # the client went away (or the gateway stops): stop decoding for it
            events.cancel()
            raise
        yield "data: [DONE]\n\n"


def _server(spec: ModelSpec, settings: ServeSettings):
    # Serve admits 5 requests per replica by default: too few to fill a batch; the rest wait in the replica.
    options = {
        "ray_actor_options": {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus},
        "name": spec.name,
        "max_ongoing_requests": spec.max_ongoing_requests or 4 * spec.max_batch_size,
        "max_queued_requests": spec.max_queued_requests,
        "backpressure_config": {"status_code": 429, "retry_after_s": 1},
    }
    if spec.num_replicas == "auto":
        options["autoscaling_config"] = {
            "min_replicas": 1,
            "max_replicas": spec.max_replicas,
            "target_ongoing_requests": spec.max_batch_size,
        }
    else:
        options["num_replicas"] = int(spec.num_replicas)
    replica = {name: getattr(spec, name) for name in REPLICA_FIELDS}
    # only the limits a model replica applies (the same pixel limit as the gateway's check: one decode path);
    # a change of the gateway's other limits leaves the models loaded
    limits = {"max_tokens": settings.limits.max_tokens, "max_image_pixels": settings.limits.max_image_pixels}
    return ModelServer.options(**options).bind(replica, limits, settings.tracking_uri)


def build(settings: ServeSettings):
    servers = {spec.name: _server(spec, settings) for spec in settings.models}
    # the proxy answers past this queue itself (503, plain text): a last line far behind the models' 429s
    gateway = Gateway.options(
        num_replicas=settings.gateway_replicas,
        ray_actor_options={"num_cpus": GATEWAY_CPUS},
        max_ongoing_requests=1000,
        max_queued_requests=1000,
        backpressure_config={"status_code": 503, "retry_after_s": 1},
    )
    return gateway.bind(servers, asdict(settings.limits), settings.api_key_file, settings.api_key_env, settings.request_timeout_s)


def build_app(args: dict):
    """`serve run` builder: args are ServeSettings fields, with `models` a list of ModelSpec dicts."""
    args = dict(args)
    models = [ModelSpec(**spec) for spec in args.pop("models", [])]
    limits = Limits(**args.pop("limits", {}))
    return build(ServeSettings(models=models, limits=limits, **args))
