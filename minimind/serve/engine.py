"""Serving a model to many clients at once, without Ray: a batching engine over the library's continuous
batch (minimind.inference.continuous), and `ChatModel`, which turns an OpenAI-style request into a stream
of events.

Batching is continuous at step granularity: requests decode together in one KV-cached batch of up to
`max_batch_size`, each row with its own sampling parameters (temperature, top-p, top-k, repetition
penalty). A request arriving while the batch decodes joins it at the next step, first come first
served: only the newcomers are prefilled, and the rows already decoding are never computed again. A
request whose client goes away, or that has its tokens or hit a stop string, leaves at the next step. A
seeded request decodes in a batch of its own within the same steps, with its own random generator, so it
samples the same tokens alone or in any company (see `BatchingEngine._decode`).
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from minimind.data.rows import IMAGE_MARKER
from minimind.inference.chat import Chat, reply_opening
from minimind.inference.continuous import ContinuousBatch
from minimind.inference.generate import compile_for_decoding, wants_compile
from minimind.inference.sampling import SamplingParams
from minimind.model.tokenizer import Markers
from minimind.serve.errors import APIError
from minimind.serve.protocol import ChatRequest, Limits, open_image, split_calls, split_reasoning


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    pixel_values: torch.Tensor | None  # its images, decoded and processed before it joins a batch
    sampling: SamplingParams  # its max_new_tokens is the request's
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    generated: list[int] = field(default_factory=list)
    done: bool = False  # the consumer needs no more tokens
    stopped: bool = False  # the model said its stop token
    ended: bool = False  # its consumer has been told the stream is over

    def __post_init__(self):
        seed = self.sampling.seed
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None  # kept across batches

    @property
    def max_new_tokens(self) -> int:
        return self.sampling.max_new_tokens

    @property
    def sent(self) -> int:
        return len(self.generated)

    @property
    def over(self) -> bool:
        return self.done or self.stopped or self.sent >= self.max_new_tokens


class BatchingEngine:
    def __init__(self, model, stop_token_ids: list[int], suppress_token_ids: list[int] | None = None,
                 max_batch_size: int = 16, batch_wait_s: float = 0.01):
        self.model, self.stop_token_ids, self.suppress_token_ids = model, stop_token_ids, suppress_token_ids
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
        self.device = next(model.parameters()).device
        self.pending: list[_Request] = []
        self.lock = threading.Lock()  # pending is read by the decode thread too
        self.wakeup: asyncio.Event | None = None
        self.worker: asyncio.Task | None = None
        self.batches_run = 0  # for tests and metrics: decode sessions, the size of each (re-)formed batch,
        self.batch_sizes: list[int] = []  # and (tokens sent, tokens asked) of each request of the last session
        self.last_batch: list[tuple[int, int]] = []
        self.running = False
        self.last_step = time.monotonic()  # when the decode loop last finished a step (or started a session)
        self.rows_decoding = 0  # requests in the running decode session

    async def stream(self, prompt_ids: list[int], sampling: SamplingParams,
                     pixel_values: torch.Tensor | None = None) -> AsyncIterator[list[int]]:
        """The new tokens of one request as they are decoded (its stop token excluded), in chunks: all those
        decoded since the consumer last asked, so a consumer slower than the decoder handles fewer, larger
        pieces. `sampling`'s stop and suppressed ids are the engine's; `pixel_values` are the prompt's images,
        processed already (the decode loop never decodes an image: one bad or slow image would stall or fail
        every request joining with it)."""
        room = self.model.config.max_position_embeddings - len(prompt_ids)
        if room < 1 or not prompt_ids:
            raise ValueError(
                f"a prompt of {len(prompt_ids)} tokens leaves no room in the {room + len(prompt_ids)}-position context"
            )
        request = _Request(prompt_ids, pixel_values, replace(sampling, max_new_tokens=min(sampling.max_new_tokens, room)))
        if self.worker is None or self.worker.done():
            self.wakeup = asyncio.Event()
            self.worker = asyncio.get_running_loop().create_task(self._run())
        with self.lock:
            self.pending.append(request)
        self.wakeup.set()
        try:
            while True:
                items = [await request.queue.get()]
                while not request.queue.empty():
                    items.append(request.queue.get_nowait())
                tokens = [item for item in items if isinstance(item, int)]
                if tokens:
                    yield tokens
                if errors := [item for item in items if isinstance(item, BaseException)]:
                    raise errors[0]
                if None in items:
                    return
        finally:
            request.done = True  # the client is gone, or has what it needs: free the batch row

    async def _run(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self._waiting():
                await asyncio.sleep(self.batch_wait_s)  # let requests sent together arrive together
                self.running, self.last_step = True, time.monotonic()
                try:
                    await asyncio.to_thread(self._decode, asyncio.get_running_loop())
                finally:
                    self.running = False

    def stuck_for(self) -> float:
        """Seconds the decode loop has been busy without finishing a step; 0 while it is idle."""
        return time.monotonic() - self.last_step if self.running else 0.0

    def _waiting(self) -> bool:
        with self.lock:
            return any(not r.done for r in self.pending)

    def _take(self, room: int) -> list[_Request]:
        """The longest-waiting live requests, up to `room`, whatever their settings."""
        with self.lock:
            live = [r for r in self.pending if not r.done]
            taken, self.pending = live[:room], live[room:]
        return taken

    def _decode(self, loop: asyncio.AbstractEventLoop) -> None:
        """One decode session: every new request joins at the next step, until none is left.

        Unseeded requests share one `ContinuousBatch`. Each seeded request decodes in a batch of its own:
        it then computes exactly what it would alone, bit for bit (a batch's padding changes how kernels
        round, and in bf16 that flips sampled tokens), at the price of reading the weights once more per step."""
        session: list[_Request] = []
        try:
            with torch.inference_mode():
                self._decode_session(session, loop)
        except Exception as error:  # noqa: BLE001 - a bug must not leave clients waiting for ever
            self._fail(session, error, loop)
        self.last_batch = [(r.sent, r.max_new_tokens) for r in session]

    def _decode_session(self, session: list[_Request], loop: asyncio.AbstractEventLoop) -> None:
        shared, seeded = ContinuousBatch(self.model, self.stop_token_ids, self.suppress_token_ids), []
        self.batches_run += 1
        while True:
            live = shared.open_rows + len(seeded)
            if live < self.max_batch_size and self._waiting():
                joined = self._take(self.max_batch_size - live)
                session += joined
                for request in joined:
                    if request.sampling.seed is not None:
                        seeded.append(ContinuousBatch(self.model, self.stop_token_ids, self.suppress_token_ids))
                        self._add(seeded[-1], [request], loop)
                unseeded = [r for r in joined if r.sampling.seed is None]
                if unseeded:
                    self._add(shared, unseeded, loop)
                self.batch_sizes.append(live + len(joined))
            seeded = [batch for batch in seeded if batch.open_rows]
            self.rows_decoding = shared.open_rows + len(seeded)
            if not self.rows_decoding:
                break
            for batch in [shared, *seeded]:
                batch.finish([r for r in batch.keys if r.over])
                try:
                    results = batch.step()
                except Exception as error:  # noqa: BLE001 - handed to every client of the batch
                    results = []
                    self._fail(list(batch.keys), error, loop)
                    batch.finish(batch.keys)
                self._deliver(results, loop)
                self.last_step = time.monotonic()

    def _add(self, batch: ContinuousBatch, requests: list[_Request], loop) -> None:
        """Prefill `requests` into `batch`. When that fails, each of them is prefilled alone, so that only
        the requests that fail alone fail (one request's bad input must not fail those joining with it)."""
        params = [replace(r.sampling, stop_token_ids=None, suppress_token_ids=None) for r in requests]
        rows_before = len(batch)
        try:
            pixels = [r.pixel_values for r in requests if r.pixel_values is not None]
            prompt_inputs = {"pixel_values": torch.cat(pixels)} if pixels else None
            first = batch.add(requests, [r.prompt_ids for r in requests], params, [r.generator for r in requests], prompt_inputs)
        except Exception as error:  # noqa: BLE001
            if len(requests) == 1 or len(batch) != rows_before:  # rows that joined before the failure cannot join again
                self._fail(requests, error, loop)
                batch.finish([r for r in requests if r in batch.keys])
            else:
                for request in requests:
                    self._add(batch, [request], loop)
            return
        for request in requests:
            request.pixel_values = None  # in the KV cache now; the session keeps its requests until it ends
        self._deliver(list(zip(requests, first)), loop)

    def _deliver(self, results: list[tuple[_Request, int | None]], loop) -> None:
        messages = []  # (queue, item) of every request: handed to the event loop in one call per step, not one per token
        for request, token in results:
            if token is None:
                request.stopped = request.stopped or not request.over  # its stop token
            elif not request.over:
                request.generated.append(token)
                messages.append((request.queue, token))
            if request.over:
                messages += self._end(request, None)
        _send(messages, loop)

    def _fail(self, requests: list[_Request], error: BaseException, loop) -> None:
        messages = []
        for request in requests:
            request.stopped = True
            messages += self._end(request, error)
        _send(messages, loop)

    @staticmethod
    def _end(request: _Request, error: BaseException | None) -> list[tuple[asyncio.Queue, object]]:
        """The messages that end a request's stream (its error first, if any); none if it has ended already."""
        if request.ended:
            return []
        request.ended = True
        return ([(request.queue, error)] if error is not None else []) + [(request.queue, None)]


def _send(messages: list[tuple[asyncio.Queue, object]], loop: asyncio.AbstractEventLoop) -> None:
    """Put each item in its queue, from the decode thread: one wake-up of the event loop for them all."""
    if messages:
        loop.call_soon_threadsafe(_put_all, messages)


def _put_all(messages: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in messages:
        queue.put_nowait(item)


def releasable(text: str, stops: list[str], final: bool = False) -> tuple[str, bool]:
    """The part of a reply decoded so far that may be streamed, and whether a stop string ended it.

    Only whole characters: a multi-byte character whose bytes are still arriving decodes as U+FFFD at
    the end, and is held back; bytes the model put in an invalid order decode as U+FFFD inside the text,
    and are not sent. Stop strings are matched on the text as generated, U+FFFD included: "a", an invalid
    byte, "b" does not contain "ab". Only text that can no longer turn out to be part of a stop string is
    released: a tail that begins one is held back until it either completes the stop string (cut there)
    or stops matching it (`final`: the reply is over, release it)."""
    if not final:
        text = text.rstrip("\ufffd")  # maybe a character still arriving
    cut = min((text.find(stop) for stop in stops if stop in text), default=-1)
    if cut >= 0:
        return text[:cut].replace("\ufffd", ""), True
    held = (
        0
        if final
        else max(
            (size for stop in stops for size in range(1, min(len(stop), len(text) + 1)) if text.endswith(stop[:size])), default=0
        )
    )
    return text[: len(text) - held].replace("\ufffd", ""), False


# What a streamed event costs beyond the engine, on a 2-core machine (bench/serve_overhead.py): a Ray item from the
# model replica to the gateway, an SSE chunk through the proxy. Each reply sends one event at most every
# EVENT_COST_S x (rows decoding) seconds, so a replica sends about 1 / EVENT_COST_S events a second in all.
EVENT_COST_S = 0.004


async def paced(events: AsyncIterator[dict], spacing: Callable[[], float]) -> AsyncIterator[dict]:
    """A reply's events with consecutive text deltas merged: its first delta goes at once (time to first token
    is unchanged), then one at most every `spacing()` seconds. A held delta goes with the next one due, or
    before any other event (a tool call, the end): it waits at most one decoding step beyond the spacing.
    Alone in the batch a reply still streams token by token (one row: steps are slower than the spacing)."""
    held, sent_at = None, None
    async for event in events:
        if event["type"] != "delta":
            if held is not None:
                yield held
                held = None
            yield event
            continue
        if held is not None:
            event = {**event, "reasoning": held["reasoning"] + event["reasoning"], "content": held["content"] + event["content"]}
        now = time.monotonic()
        if sent_at is None or now - sent_at >= spacing():
            yield event
            held, sent_at = None, now
        else:
            held = event
    if held is not None:
        yield held


class Released:
    """What of one reply has been streamed: each longer releasable text becomes a delta event of its new
    reasoning and content (the reasoning model's <think>/<answer> parts split as they arrive)."""

    def __init__(self, markers, opening: str = "", tools: bool = False):
        self.think, self.answer = (markers.think_start, markers.think_end), (markers.answer_start, markers.answer_end)
        self.opening = opening  # what the prompt wrote of the reply: minimind-3's opened or empty think block, a forced call
        self.tools = tools  # the reply may call tools: its calls are held back, and read when it is over
        self.reasoning, self.content = "", ""
        self.calls: list[dict] | None = None

    def extend(self, text: str, final: bool = False) -> dict | None:
        reasoning, content = split_reasoning(self.opening + text, self.think, self.answer, final)
        if self.tools:
            content, self.calls = split_calls(content, final)
        new_reasoning, new_content = reasoning[len(self.reasoning) :], content[len(self.content) :]
        if not (new_reasoning or new_content):
            return None
        self.reasoning, self.content = reasoning, content
        return {"type": "delta", "reasoning": new_reasoning, "content": new_content}


class ChatModel:
    """A model directory served as one chat model: prompt building, batching, detokenising, reasoning
    split, stop strings. `chat()` yields events: {"type": "start", "prompt_tokens"}, then
    {"type": "delta", "reasoning", "content"}..., then {"type": "end", "finish_reason", "completion_tokens"}."""

    def __init__(
        self,
        model_dir: str | Path,
        limits: Limits | None = None,
        max_batch_size: int = 16,
        batch_wait_s: float = 0.01,
        dtype: str = "bf16",
        device: str | None = None,
        compile: str = "auto",
    ):
        self.loaded = Chat.load(model_dir, device=device, dtype=dtype)
        self.model, self.tokenizer, self.takes_images = self.loaded.model, self.loaded.tokenizer, self.loaded.takes_images
        if wants_compile(compile, next(self.model.parameters()).device):
            compile_for_decoding(self.model)  # one-row steps; the first compiles (see minimind.inference.generate)
        self.markers = Markers.of(self.tokenizer)
        self.limits = limits or Limits()
        self.context = self.model.config.max_position_embeddings
        self.engine = BatchingEngine(self.model, self.loaded.stop_ids, self.loaded.suppressed_ids, max_batch_size, batch_wait_s)
        # decoding and resizing images happens here, before a request joins the batch; two threads bound
        # the memory that images being decoded take
        self.image_decoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode-images")

    def pixel_values(self, images: list[bytes]) -> torch.Tensor:
        """The model's input for a request's images, decoded the way the gateway checked them."""
        return self.model.pixel_values([open_image(data, self.limits.max_image_pixels, "messages") for data in images])

    def paced_chat(self, request: ChatRequest) -> AsyncIterator[dict]:
        """`chat` for a consumer each event costs something to reach (Serve's gateway): see `paced`."""
        return paced(self.chat(request), lambda: EVENT_COST_S * max(1, self.engine.rows_decoding))

    async def chat(self, request: ChatRequest) -> AsyncIterator[dict]:
        forced = request.forced_call()  # a call the client requires: written into the prompt, after no reasoning
        thinking = False if forced else request.thinking
        prompt = self.loaded.prompt_ids(request.messages, request.prompt_tools(), thinking)
        if forced:
            prompt += self.tokenizer.encode(forced, add_special_tokens=False)
        if self.takes_images:  # counted in the prompt's ids: the text may also spell the tokenizer's own image marker
            placeholders = prompt.count(self.model.image_token_id) // self.model.image_tokens
            if placeholders != len(request.images):
                spelled = IMAGE_MARKER if self.markers.image == IMAGE_MARKER else f"{IMAGE_MARKER} or {self.markers.image}"
                raise APIError(
                    400,
                    f"{placeholders} image marker(s) ({spelled}) in the messages but {len(request.images)} image(s)",
                    param="messages",
                )
        room = self.context - len(prompt)
        if room < 1:
            raise APIError(
                400,
                f"the prompt has {len(prompt)} tokens; this model's context window is {self.context}",
                param="messages",
                code="context_length_exceeded",
            )
        sampling = SamplingParams(
            max_new_tokens=min(request.max_tokens or self.limits.max_tokens, room),
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            repetition_penalty=request.repetition_penalty,
            seed=request.seed,
        )
        pixel_values = None
        if request.images:  # an unreadable image fails this request only, with a 400
            pixel_values = await asyncio.get_running_loop().run_in_executor(self.image_decoder, self.pixel_values, request.images)
        yield {"type": "start", "prompt_tokens": len(prompt)}
        opening = reply_opening(self.tokenizer, thinking) + forced
        tokens, released, finish = [], Released(self.markers, opening, tools=request.prompt_tools() is not None), "length"
        stream = self.engine.stream(prompt, sampling, pixel_values)
        try:
            async for chunk in stream:
                tokens += chunk
                text, stopped = releasable(self.tokenizer.decode(tokens, skip_special_tokens=False), request.stop)
                if delta := released.extend(text, final=stopped):
                    yield delta
                if stopped:
                    finish = "stop"
                    break
            else:
                finish = "length" if len(tokens) >= sampling.max_new_tokens else "stop"
                text, _ = releasable(self.tokenizer.decode(tokens, skip_special_tokens=False), request.stop, final=True)
                if delta := released.extend(text, final=True):
                    yield delta
        finally:
            await stream.aclose()
        if released.calls:
            calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "name": call["name"],
                      "arguments": json.dumps(call["arguments"], ensure_ascii=False)} for call in released.calls]
            yield {"type": "tool_calls", "calls": calls}
            finish = "tool_calls"
        yield {"type": "end", "finish_reason": finish, "completion_tokens": len(tokens)}
