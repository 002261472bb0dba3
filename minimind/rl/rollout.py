"""The rollout worker of reinforcement learning: a copy of the policy that samples a group of
completions per prompt with the project's batched, KV-cached decoder (minimind.inference.generate).

The GRPO loop (minimind.rl.grpo) runs it as a Ray actor and, after every update, hands it the policy's new
weights through Ray's object store (only the adapters for a LoRA policy). It is built from the model's
config alone and reads no file: on a cluster it may run on any node, on one machine it shares it with
the trainer (they take turns: the trainer waits for the rollouts, the rollouts wait for the update).
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from minimind.inference.generate import stream_batch
from minimind.inference.sampling import SamplingParams
from minimind.model.config import ModelConfig
from minimind.model.lora import LoRAConfig, add_lora
from minimind.model.model import MiniMindForCausalLM
from minimind.rl.tool_turns import ToolTurns


def unique_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state with every tensor once, under its first name: a tied output head is the
    embedding, and sending it twice cost 9% more per hand-over (8.97 MB for an 8.24 MB model)."""
    seen, unique = set(), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            unique[name] = tensor
    return unique


class RolloutWorker:
    def __init__(self, model_config: dict, lora: LoRAConfig | None = None, threads: int = 0, bf16: bool = True):
        if threads:
            torch.set_num_threads(threads)  # an actor with num_cpus=0 would otherwise get one thread
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = MiniMindForCausalLM(ModelConfig.from_dict(model_config))
        if lora:
            add_lora(self.model, lora)
        self.model.to(self.device).eval()  # dropout off, as the policy GRPO trains (minimind.rl.grpo.policy_to_train)
        self.bf16 = bf16 and (self.device.type == "cpu" or torch.cuda.is_bf16_supported())
        self.version = -1  # the policy update whose weights it holds; -1: none yet

    def load_weights(self, state: dict[str, torch.Tensor], version: int) -> int:
        """Take the policy's weights after update `version`: all of them, each tensor once (a tied head comes
        as its embedding), or, once a whole model is in place, only the adapters of a LoRA policy (all of
        them). Anything less is refused: the model's own random weights would stay in place, silently."""
        own = self.model.state_dict(keep_vars=True)
        unexpected = sorted(set(state) - set(own))
        if unexpected:
            raise ValueError(f"weights the rollout model does not have: {unexpected[:4]}")
        names_of: dict[int, list[str]] = {}  # each tensor's names: a tied one has two
        for name, tensor in own.items():
            names_of.setdefault(id(tensor), []).append(name)
        adapters_only = self.version >= 0 and any(".lora_" in name for name in own) and all(".lora_" in name for name in state)
        missing = [names[0] for names in names_of.values()
                   if (not adapters_only or ".lora_" in names[0]) and not any(name in state for name in names)]
        if missing:
            what = "adapter" if adapters_only else "model"
            raise ValueError(f"the hand-over of version {version} lacks {len(missing)} of the rollout {what}'s tensors, e.g. "
                             f"{missing[:4]}: they would keep {'their last' if self.version >= 0 else 'random'} values")
        self.model.load_state_dict(state, strict=False)  # what is left out is only the tied twin of a tensor given
        self.version = version
        return version

    def _sample(self, prompts: list[list[int]], sampling: dict) -> tuple[list[list[int]], list[bool]]:
        """One sampled continuation of every prompt (stop token excluded), and whether each ended with one."""
        completions, finished = [[] for _ in prompts], [False] * len(prompts)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with torch.no_grad(), autocast:
            for tokens in stream_batch(self.model, prompts, SamplingParams(**sampling)):
                for row, token in enumerate(tokens):
                    if token is None:
                        finished[row] = True  # from the step it sampled its stop token on
                    else:
                        completions[row].append(token)
        return completions, finished

    def generate(self, prompts: list[list[int]], group_size: int, sampling: dict, tool_turns: ToolTurns | None = None,
                 max_turns: int = 2) -> dict:
        """`group_size` sampled completions of every prompt, prompt by prompt (stop token excluded), whether
        each ended with a stop token (not cut off by the token budget or the context), the version of the
        weights that wrote them, and the seconds it took.

        With `tool_turns`, a completion whose turn ends with tool calls goes on: the tools' results turn
        (`ToolTurns.results_turn`), then the policy's next turn, up to `max_turns` turns. `inserted` lists each
        completion's (start, end) spans of tokens the tools wrote, which are not the policy's to train on."""
        started = time.perf_counter()
        repeated = [prompt for prompt in prompts for _ in range(group_size)]
        completions, finished = self._sample(repeated, sampling)
        inserted: list[list[tuple[int, int]]] = [[] for _ in repeated]
        for turn in range(1, max_turns if tool_turns else 1):
            glue = {row: tool_turns.results_turn(completions[row][inserted[row][-1][1] if inserted[row] else 0:])
                    for row in range(len(repeated)) if finished[row]}
            rows = [row for row, tokens in glue.items() if tokens]
            if not rows:
                break
            seed = sampling.get("seed")
            more, more_finished = self._sample([repeated[row] + completions[row] + glue[row] for row in rows],
                                               {**sampling, "seed": None if seed is None else seed + turn})
            for row, tokens, done in zip(rows, more, more_finished):
                start = len(completions[row]) + 1  # the end-of-turn token the policy sampled is its own
                completions[row] += glue[row] + tokens
                inserted[row].append((start, start + len(glue[row]) - 1))
                finished[row] = done
        return {
            "completions": completions,
            "finished": finished,
            "inserted": inserted,
            "version": self.version,
            "seconds": time.perf_counter() - started,
        }
