"""Our model behind lm-evaluation-harness's `LM` interface, so every harness task runs on it.

- `loglikelihood`: the continuation's summed log-probability after its context, and whether greedy decoding
  would have written it (multiple choice: the highest-scoring choice is the answer).
- `loglikelihood_rolling`: a whole text's log-probability, in windows of the model's context (perplexity tasks).
- `generate_until`: our batched generator (`inference.generate`), cut at the task's stop strings.
- `apply_chat_template`: the tokenizer's own template, as the chat models were trained (`--apply_chat_template`).

Rows are scored in batches sorted by length, right-padded (a causal model never looks at the padding after a row).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from minimind.inference.chat import Chat
from minimind.inference.generate import generate


class HarnessLM(LM):
    def __init__(self, chat: Chat, name: str = "minimind", batch_size: int = 16):
        super().__init__()
        self.chat, self.name, self.batch_size = chat, name, batch_size
        self.language_model = getattr(chat.model, "language_model", chat.model)  # a VLM's text half for text tasks
        self.max_length = self.language_model.config.max_position_embeddings

    @property
    def tokenizer_name(self) -> str:
        return self.name

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.chat.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        return self.chat.tokenizer.encode(text, add_special_tokens=False)

    def context_and_continuation(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of both, split where the whole string's tokens split: a merge across the boundary stays
        one token, as the model saw such text in training."""
        whole, context_ids = self.encode(context + continuation), self.encode(context)
        shared = 0
        while shared < min(len(context_ids), len(whole) - 1) and whole[shared] == context_ids[shared]:
            shared += 1
        return whole[:shared], whole[shared:]

    @torch.no_grad()
    def scored(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log-probability of the continuation, greedy would write it) per (context ids, continuation ids); the
        context is cut from the left to fit the model's window."""
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][0]) + len(rows[i][1])))
        device = next(self.language_model.parameters()).device
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            sequences = [(rows[i][0] + rows[i][1])[-(self.max_length + 1):] for i in batch]
            inputs = [sequence[:-1] for sequence in sequences]
            width = max(len(ids) for ids in inputs)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            for row, sequence in enumerate(inputs):
                ids[row, : len(sequence)] = torch.tensor(sequence)
            logprobs = torch.log_softmax(self.language_model(ids.to(device)).logits.float(), dim=-1).cpu()
            for row, i in enumerate(batch):
                n, targets = len(rows[i][1]), torch.tensor(sequences[row][-len(rows[i][1]):])
                positions = torch.arange(len(inputs[row]) - n, len(inputs[row]))
                picked = logprobs[row, positions]
                results[i] = (picked.gather(1, targets[:, None]).sum().item(), bool((picked.argmax(-1) == targets).all()))
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        rows = []
        for request in requests:
            context, continuation = request.args
            context_ids, continuation_ids = self.context_and_continuation(context, continuation)
            rows.append((context_ids or [self.chat.tokenizer.eos_token_id], continuation_ids))
        return self.scored(rows)

    def loglikelihood_rolling(self, requests) -> list[float]:
        totals = []
        for request in requests:
            windows = [
                make_disjoint_window(window)
                for window in get_rolling_token_windows(
                    self.encode(request.args[0]), prefix_token=self.chat.tokenizer.eos_token_id,
                    max_seq_len=self.max_length, context_len=1,
                )
            ]
            totals.append(sum(logprob for logprob, _ in self.scored(windows)))
        return totals

    def generate_until(self, requests) -> list[str]:
        """Greedy unless the task samples; requests with the same settings decode in one batch."""
        groups: dict[str, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[repr(sorted(request.args[1].items()))].append(index)
        replies: list[str | None] = [None] * len(requests)
        for indices in groups.values():
            settings = dict(requests[indices[0]].args[1])
            until = settings.get("until") or []
            until = [until] if isinstance(until, str) else until
            temperature = float(settings.get("temperature", 0.0)) if settings.get("do_sample", False) else 0.0
            params = self.chat.sampling(max_new_tokens=int(settings.get("max_gen_toks", 256)), temperature=temperature)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                prompts = [self.encode(requests[i].args[0])[-(self.max_length - params.max_new_tokens):] for i in batch]
                for i, ids in zip(batch, generate(self.language_model, prompts, params)):
                    text = self.chat.tokenizer.decode(ids, skip_special_tokens=True)
                    replies[i] = min((text.split(stop)[0] for stop in until), key=len, default=text)
        return replies
