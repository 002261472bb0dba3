"""Serving a model to many clients at once, without Ray: a batching engine over the library's KV-cached
batched decoder, and `ChatModel`, which turns an OpenAI-style request into a stream of events.

Batching is continuous at step granularity: requests that sample alike decode together as one
left-padded, KV-cached batch of up to `max_batch_size`. A request arriving while a batch decodes joins
it at the next step: the batch is re-formed from each row's prompt plus the tokens it has so far and
prefilled again (a prefill of the whole batch costs about as much as a few decode steps of it, and
spares the newcomer a wait for the whole batch). A request whose client goes away, or that has its
tokens or hit a stop string, leaves at the next step. Seeded requests decode only with requests of
the same seed and admit no newcomers, so what they sample does not depend on timing.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minimind.generate import SamplingParams, stream_batch
from minimind.serve.protocol import APIError, ChatRequest, Limits, split_reasoning


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    images: list[bytes]
    sampling: tuple  # (temperature, top_p, seed): requests batch only with equal sampling
    max_new_tokens: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    generated: list[int] = field(default_factory=list)
    done: bool = False  # the consumer needs no more tokens
    stopped: bool = False  # the model said its stop token

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

    async def stream(self, prompt_ids: list[int], images: list[bytes], temperature: float, top_p: float,
                     seed: int | None, max_new_tokens: int) -> AsyncIterator[int]:
        """The new tokens of one request, as they are decoded (its stop token excluded)."""
        request = _Request(prompt_ids, images, (temperature, top_p, seed), max_new_tokens)
        if self.worker is None or self.worker.done():
            self.wakeup = asyncio.Event()
            self.worker = asyncio.get_running_loop().create_task(self._run())
        with self.lock:
            self.pending.append(request)
        self.wakeup.set()
        try:
            while True:
                item = await request.queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.done = True  # the client is gone, or has what it needs: free the batch row

    async def _run(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self._waiting(None):
                await asyncio.sleep(self.batch_wait_s)  # let requests sent together arrive together
                self.running, self.last_step = True, time.monotonic()
                try:
                    await asyncio.to_thread(self._decode, asyncio.get_running_loop())
                finally:
                    self.running = False

    def stuck_for(self) -> float:
        """Seconds the decode loop has been busy without finishing a step; 0 while it is idle."""
        return time.monotonic() - self.last_step if self.running else 0.0

    def _waiting(self, key: tuple | None) -> bool:
        with self.lock:
            return any(not r.done and (key is None or r.sampling == key) for r in self.pending)

    def _take(self, key: tuple | None, room: int) -> list[_Request]:
        with self.lock:
            live = [r for r in self.pending if not r.done]
            key = key if key is not None else (live[0].sampling if live else None)
            taken = [r for r in live if r.sampling == key][:room]
            self.pending = [r for r in live if r not in taken]
        return taken

    def _decode(self, loop: asyncio.AbstractEventLoop) -> None:
        """One decode session: a batch that new requests with the same sampling join until none is left."""
        rows = self._take(None, self.max_batch_size)
        if not rows:
            return
        key = rows[0].sampling
        temperature, top_p, seed = key
        self.batches_run += 1
        session = list(rows)
        while rows:
            self.batch_sizes.append(len(rows))
            params = SamplingParams(
                max_new_tokens=max(r.max_new_tokens - r.sent for r in rows), temperature=temperature, top_p=top_p, seed=seed,
                stop_token_ids=self.stop_token_ids, suppress_token_ids=self.suppress_token_ids,
            )
            newcomers = False
            try:
                images = [image for r in rows for image in r.images]
                prompt_inputs = {"pixel_values": self._pixels(images)} if images else None
                prompts = [r.prompt_ids + r.generated for r in rows]
                stop_rows = lambda: [i for i, r in enumerate(rows) if r.over]  # noqa: E731
                with torch.inference_mode():
                    for step in stream_batch(self.model, prompts, params, prompt_inputs, stop_rows=stop_rows):
                        self.last_step = time.monotonic()
                        for request, token in zip(rows, step):
                            if token is None:
                                request.stopped = request.stopped or not request.over
                            elif not request.over:
                                request.generated.append(token)
                                loop.call_soon_threadsafe(request.queue.put_nowait, token)
                        if seed is None and len([r for r in rows if not r.over]) < self.max_batch_size and self._waiting(key):
                            newcomers = True
                            break
            except Exception as error:  # noqa: BLE001 - handed to every client of the batch
                for request in rows:
                    request.stopped = True
                    loop.call_soon_threadsafe(request.queue.put_nowait, error)
            for request in rows:
                if request.over:
                    loop.call_soon_threadsafe(request.queue.put_nowait, None)
            rows = [r for r in rows if not r.over]
            if newcomers:
                joined = self._take(key, self.max_batch_size - len(rows))
                rows, session = rows + joined, session + joined
        self.last_batch = [(r.sent, r.max_new_tokens) for r in session]

    def _pixels(self, images: list[bytes]) -> torch.Tensor:
        from minimind.vision import load_image

        return self.model.pixel_values([load_image(io.BytesIO(data), name="image") for data in images])


class ChatModel:
    """A model directory served as one chat model: prompt building, batching, detokenising, reasoning
    split, stop strings. `chat()` yields events: {"type": "start", "prompt_tokens"}, then
    {"type": "delta", "reasoning", "content"}..., then {"type": "end", "finish_reason", "completion_tokens"}."""

    def __init__(self, model_dir: str | Path, limits: Limits | None = None, max_batch_size: int = 16,
                 batch_wait_s: float = 0.01, dtype: str = "bf16", device: str | None = None):
        from minimind.checkpoint import load_model
        from minimind.generate import inference_dtype
        from minimind.tokenizer import Markers, load_tokenizer
        from minimind.vision import is_vlm_dir, load_vlm

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.takes_images = is_vlm_dir(model_dir)
        weights = inference_dtype(dtype, device)  # bf16: half the bytes read per decoded token
        self.model = (load_vlm if self.takes_images else load_model)(model_dir, device=device, dtype=weights).eval()
        self.tokenizer = load_tokenizer(model_dir)
        self.markers = Markers.of(self.tokenizer)
        self.limits = limits or Limits()
        self.context = self.model.config.max_position_embeddings
        stops = sorted({self.model.config.eos_token_id, self.tokenizer.eos_token_id} - {None})
        # a VLM never samples its placeholder; a text model needs no image token at all
        image_id = [self.model.image_token_id] if self.takes_images else []
        self.engine = BatchingEngine(self.model, stops, image_id, max_batch_size, batch_wait_s)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        if self.takes_images:
            from minimind.vision import prompt_ids

            return prompt_ids(self.model, self.tokenizer, messages)
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))

    async def chat(self, request: ChatRequest) -> AsyncIterator[dict]:
        from minimind.data import IMAGE_MARKER

        if self.takes_images:  # checked here: one bad request must not fail the batch it would join
            markers = sum(m["content"].count(IMAGE_MARKER) for m in request.messages)
            if markers != len(request.images):
                raise APIError(400, f"{markers} {IMAGE_MARKER} marker(s) in the messages but {len(request.images)} image(s)", param="messages")
        prompt = self.prompt_ids(request.messages)
        room = self.context - len(prompt)
        if room < 1:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; this model's context window is {self.context}",
                           param="messages", code="context_length_exceeded")
        max_new_tokens = min(request.max_tokens or self.limits.max_tokens, room)
        yield {"type": "start", "prompt_tokens": len(prompt)}
        tokens, reasoning_sent, content_sent, finish = [], "", "", "length"
        think, answer = (self.markers.think_start, self.markers.think_end), (self.markers.answer_start, self.markers.answer_end)
        stream = self.engine.stream(prompt, request.images, request.temperature, request.top_p, request.seed, max_new_tokens)
        try:
            async for token in stream:
                tokens.append(token)
                text = self.tokenizer.decode(tokens, skip_special_tokens=False)
                if text.endswith("\ufffd"):
                    continue  # the rest of a multi-byte character is still coming
                cut = min((text.find(s) for s in request.stop if s in text), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                reasoning, content = split_reasoning(text, think, answer)
                if reasoning[len(reasoning_sent):] or content[len(content_sent):]:
                    yield {"type": "delta", "reasoning": reasoning[len(reasoning_sent):], "content": content[len(content_sent):]}
                    reasoning_sent, content_sent = reasoning, content
                if finish == "stop":
                    break
            else:
                finish = "length" if len(tokens) >= max_new_tokens else "stop"
        finally:
            await stream.aclose()
        yield {"type": "end", "finish_reason": finish, "completion_tokens": len(tokens)}
