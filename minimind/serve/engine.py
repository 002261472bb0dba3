"""Serving a model to many clients at once, without Ray: a batching engine over the library's KV-cached
batched decoder, and `ChatModel`, which turns an OpenAI-style request into a stream of events.

Batching is static: requests that arrive within `batch_wait_s` of each other (and sample alike) decode
together as one left-padded batch of up to `max_batch_size`; requests arriving meanwhile wait for the
next batch. A request whose client goes away, or that has its tokens or hit a stop string, leaves the
batch at the next step, and a batch ends as soon as none of its requests needs more tokens.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import nullcontext
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
    sent: int = 0
    done: bool = False  # the consumer needs no more tokens


class BatchingEngine:
    def __init__(self, model, stop_token_ids: list[int], suppress_token_ids: list[int] | None = None,
                 max_batch_size: int = 16, batch_wait_s: float = 0.01, dtype: torch.dtype | None = None):
        self.model, self.stop_token_ids, self.suppress_token_ids = model, stop_token_ids, suppress_token_ids
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
        self.device = next(model.parameters()).device
        self.autocast = torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()
        self.pending: list[_Request] = []
        self.wakeup: asyncio.Event | None = None
        self.worker: asyncio.Task | None = None
        self.batches_run = 0  # for tests and metrics: how many decode batches, their sizes, and the
        self.batch_sizes: list[int] = []  # (tokens sent, tokens asked) of each row of the last batch
        self.last_batch: list[tuple[int, int]] = []
        self.running = False

    async def stream(self, prompt_ids: list[int], images: list[bytes], temperature: float, top_p: float,
                     seed: int | None, max_new_tokens: int) -> AsyncIterator[int]:
        """The new tokens of one request, as they are decoded (its stop token excluded)."""
        request = _Request(prompt_ids, images, (temperature, top_p, seed), max_new_tokens)
        if self.worker is None or self.worker.done():
            self.wakeup = asyncio.Event()
            self.worker = asyncio.get_running_loop().create_task(self._run())
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
            while self.pending:
                await asyncio.sleep(self.batch_wait_s)  # let requests sent together arrive together
                key = self.pending[0].sampling
                batch = [r for r in self.pending if r.sampling == key and not r.done][: self.max_batch_size]
                self.pending = [r for r in self.pending if r not in batch and not r.done]
                if batch:
                    self.running = True
                    try:
                        await asyncio.to_thread(self._decode, batch, asyncio.get_running_loop())
                    finally:
                        self.running = False

    def _decode(self, batch: list[_Request], loop: asyncio.AbstractEventLoop) -> None:
        temperature, top_p, seed = batch[0].sampling
        params = SamplingParams(
            max_new_tokens=max(r.max_new_tokens for r in batch), temperature=temperature, top_p=top_p, seed=seed,
            stop_token_ids=self.stop_token_ids, suppress_token_ids=self.suppress_token_ids,
        )
        self.batches_run += 1
        self.batch_sizes.append(len(batch))

        def finished_rows():
            return [row for row, r in enumerate(batch) if r.done or r.sent >= r.max_new_tokens]

        try:
            images = [image for r in batch for image in r.images]
            prompt_inputs = {"pixel_values": self._pixels(images)} if images else None
            with torch.inference_mode(), self.autocast:
                for step in stream_batch(self.model, [r.prompt_ids for r in batch], params, prompt_inputs, stop_rows=finished_rows):
                    for request, token in zip(batch, step):
                        if token is not None and not request.done and request.sent < request.max_new_tokens:
                            request.sent += 1
                            loop.call_soon_threadsafe(request.queue.put_nowait, token)
        except Exception as error:  # noqa: BLE001 - handed to every waiting client
            for request in batch:
                loop.call_soon_threadsafe(request.queue.put_nowait, error)
        finally:
            self.last_batch = [(r.sent, r.max_new_tokens) for r in batch]
            for request in batch:
                loop.call_soon_threadsafe(request.queue.put_nowait, None)

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
        from minimind.tokenizer import Markers, load_tokenizer
        from minimind.vision import is_vlm_dir, load_vlm

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.takes_images = is_vlm_dir(model_dir)
        self.model = (load_vlm if self.takes_images else load_model)(model_dir, device=device).eval()
        self.tokenizer = load_tokenizer(model_dir)
        self.markers = Markers.of(self.tokenizer)
        self.limits = limits or Limits()
        self.context = self.model.config.max_position_embeddings
        stops = sorted({self.model.config.eos_token_id, self.tokenizer.eos_token_id} - {None})
        image_id = [self.model.image_token_id] if self.takes_images else [self.markers.ids(self.tokenizer)["image"]]
        amp = torch.bfloat16 if dtype == "bf16" and (device == "cpu" or torch.cuda.is_bf16_supported()) else None
        self.engine = BatchingEngine(self.model, stops, image_id, max_batch_size, batch_wait_s, amp)

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
