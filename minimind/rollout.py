"""The rollout worker of reinforcement learning: a copy of the policy that samples a group of
completions per prompt with the project's batched, KV-cached decoder (minimind.generate).

The GRPO loop (minimind.grpo) runs it as a Ray actor and, after every update, hands it the policy's new
weights through Ray's object store (only the adapters for a LoRA policy). It is built from the model's
config alone and reads no file: on a cluster it may run on any node, on one machine it shares it with
the trainer (they take turns: the trainer waits for the rollouts, the rollouts wait for the update).
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from minimind.config import ModelConfig
from minimind.generate import SamplingParams, stream_batch
from minimind.lora import LoRAConfig, add_lora
from minimind.model import MiniMindForCausalLM


class RolloutWorker:
    def __init__(self, model_config: dict, lora: LoRAConfig | None = None, threads: int = 0, bf16: bool = True):
        if threads:
            torch.set_num_threads(threads)  # an actor with num_cpus=0 would otherwise get one thread
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = MiniMindForCausalLM(ModelConfig.from_dict(model_config))
        if lora:
            add_lora(self.model, lora)
        self.model.to(self.device).eval()
        self.bf16 = bf16 and (self.device.type == "cpu" or torch.cuda.is_bf16_supported())
        self.version = -1  # the policy update whose weights it holds; -1: none yet

    def load_weights(self, state: dict[str, torch.Tensor], version: int) -> int:
        """Take the policy's weights (all of them, or the adapters of a LoRA policy) after update `version`."""
        own = self.model.state_dict()
        unexpected = sorted(set(state) - set(own))
        if unexpected:
            raise ValueError(f"weights the rollout model does not have: {unexpected[:4]}")
        self.model.load_state_dict(state, strict=False)
        self.version = version
        return version

    def generate(self, prompts: list[list[int]], group_size: int, sampling: dict) -> dict:
        """`group_size` sampled completions of every prompt, prompt by prompt (stop token excluded), whether
        each ended with a stop token (not cut off by the token budget or the context), the version of the
        weights that wrote them, and the seconds it took."""
        started = time.perf_counter()
        repeated = [prompt for prompt in prompts for _ in range(group_size)]
        completions, finished = [[] for _ in repeated], [False] * len(repeated)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with torch.no_grad(), autocast:
            for tokens in stream_batch(self.model, repeated, SamplingParams(**sampling)):
                for row, token in enumerate(tokens):
                    if token is None:
                        finished[row] = True  # from the step it sampled its stop token on
                    else:
                        completions[row].append(token)
        return {"completions": completions, "finished": finished, "version": self.version, "seconds": time.perf_counter() - started}
