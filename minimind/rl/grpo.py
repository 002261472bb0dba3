"""GRPO: reinforcement learning from rewards, the loop each Ray Train worker of `jobs/grpo.py` runs.

Every step, on each worker, in named phases (the functions of this module):
    hand_over:      the policy's weights (each tensor once) --Ray's object store--> rollout actor (minimind.rl.rollout)
    roll_out:       G sampled completions per prompt at --temperature / --top-p
    score_rollouts: rewards (minimind.rl.rewards) -> advantages within each group; the old policy's and the
                    reference's log-probabilities (score_before_update)
    update:         clipped policy-gradient loss (grpo) or capped importance weights (cispo) + KL to the
                    frozen starting model --> AdamW step(s)
    report:         reward and completion statistics over every rank's rollouts (rollout_stats)

Two choices keep the ratio pi / pi_old and the policy gradient those of the policy that sampled, as
TRL's GRPO does: every log-probability is scored at the sampling temperature, softmax(logits / T), on the
whole vocabulary (not the top-p truncation: below top-p 1 the ratios are those of the untruncated
policy); and the policy runs with dropout off (`policy_to_train`), the rollout actor's policy exactly.

The rest is the one training loop's (minimind.training.loop): the worker's start, the optimiser step,
the schedule, DDP, checkpoints with optimiser, step and RNG state (a resumed run samples the same
completions), --compile, --val-every, the step line and MLflow metrics.
Prompts are the prepared rows of a chat file (the reasoning kind): everything before the last reply,
with that reply as the reference the answer reward compares to. With the answer reward and no model
reward, only records whose reference is in <think>/<answer> form are used: the others have no answer to check.
"""

from __future__ import annotations

import random
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from minimind.data.rows import right_pad
from minimind.data.shards import PreparedRows
from minimind.model.lora import LoRAConfig, adapter_state
from minimind.model.losses import IGNORE_INDEX, sequence_logprobs, token_logprobs
from minimind.model.model import unwrap
from minimind.model.tokenizer import Markers
from minimind.rl.losses import group_advantages, policy_loss
from minimind.rl.rewards import MODEL_REWARD, Completion, parse_weights, reasoning_parts, score
from minimind.rl.rollout import RolloutWorker, unique_tensors
from minimind.rl.tool_turns import ToolTurns, tool_results
from minimind.training.flops import peak_flops
from minimind.training.loop import (
    MetricLogger,
    StepEvents,
    adamw,
    autocast_dtype,
    autocast_to,
    compile_for_training,
    cosine_lr,
    ddp_options,
    model_to_train,
    optimiser_step,
    resume_from_checkpoint,
    say,
    start_worker,
    validate_and_report,
)
from minimind.training.stages import load_frozen


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    reference: str | None  # the record's last reply, decoded, with its opening
    opening: str = ""  # what the prompt wrote of the reply (minimind-3's opened think block), for the rewards
    turns: tuple[str, ...] = ()  # tool use: the reference's turns after the prompt (the call, the answer from its result)


def labelled_runs(labels) -> list[tuple[int, int]]:
    """(start, end) of each run of labelled tokens in a row: the replies a chat row trains on."""
    runs, start = [], None
    for i, label in enumerate(list(labels) + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def reply_text(row, run: tuple[int, int], tokenizer) -> str:
    """One labelled run of a row, decoded, its end-of-turn token dropped."""
    reply = list(row["input_ids"][run[0] : run[1]])
    while reply and reply[-1] == tokenizer.eos_token_id:
        reply.pop()
    return tokenizer.decode(reply, skip_special_tokens=False)


def training_prompts(rows, tokenizer, markers: Markers, keep_all: bool) -> list[Prompt]:
    """The prompt and reference reply of every prepared chat row: the reply is the row's last run of
    labelled tokens (its end-of-turn token dropped), the prompt everything before it."""
    prompts = []
    for index in range(len(rows)):
        row = rows[index]
        runs = labelled_runs(row["labels"])
        if not runs:
            continue
        start = runs[-1][0]
        opening = markers.reply_opening(tokenizer.decode(row["input_ids"][:start], skip_special_tokens=False))
        reference = opening + reply_text(row, runs[-1], tokenizer)
        if keep_all or reasoning_parts(reference, markers):
            prompts.append(Prompt(list(row["input_ids"][:start]), reference, opening))
    return prompts


def tool_prompts(rows, tokenizer) -> list[Prompt]:
    """Tool use (`--tools`): every chat row's first user turn (with the tools its record lists) as the prompt,
    and the assistant turns after it as the reference, each without its end-of-turn token: the call and the
    answer from the tool's result, or the one answer of a question that needs no tool."""
    prompts = []
    for index in range(len(rows)):
        row = rows[index]
        runs = labelled_runs(row["labels"])
        if runs:
            turns = tuple(reply_text(row, run, tokenizer) for run in runs)
            prompts.append(Prompt(list(row["input_ids"][: runs[0][0]]), turns[-1], turns=turns))
    return prompts


def step_prompts(prompts: list[Prompt], step: int, per_worker: int, rank: int, world: int, seed: int) -> list[Prompt]:
    """This worker's prompts of `step`: epoch after epoch a fresh shuffle of all, split among the workers."""
    per_epoch = max(1, len(prompts) // (per_worker * world))
    epoch, position = divmod(step, per_epoch)
    order = list(range(len(prompts)))
    random.Random(seed * 7919 + epoch).shuffle(order)
    start = (position * world + rank) * per_worker
    return [prompts[order[(start + i) % len(order)]] for i in range(per_worker)]


def sequences(prompts: list[Prompt], completions: list[list[int]], finished: list[bool], group_size: int,
              eos_id: int, pad_id: int, inserted: list[list[tuple[int, int]]] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + completion rows, right-padded, and their labels: the completion tokens (with the stop
    token of a completion that ended), the tokens the policy is trained on; -100 elsewhere, and on the
    `inserted` spans of each completion (the tools' results between its turns)."""
    rows, labels = [], []
    for i, completion in enumerate(completions):
        prompt = prompts[i // group_size].ids
        reply = completion + ([eos_id] if finished[i] else [])
        trained = list(reply)
        for start, end in inserted[i] if inserted else ():
            trained[start:end] = [IGNORE_INDEX] * (end - start)
        rows.append(prompt + reply)
        labels.append([IGNORE_INDEX] * len(prompt) + trained)
    width = max(len(row) for row in rows)
    return right_pad(rows, pad_id, width), right_pad(labels, IGNORE_INDEX, width)


def completion_logprobs(model, ids: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, with_aux: bool = False):
    """Log-probability of every completion token under `model` sampling at `temperature`, softmax(logits / T),
    (rows, length - 1); 0 elsewhere. With `with_aux`, also the forward's MoE load-balancing loss (0 for a dense model)."""
    output = model(ids, return_logits=False)
    logps = token_logprobs(output.hidden_states, unwrap(model).lm_head.weight, labels, temperature=temperature)
    return (logps, output.aux_loss) if with_aux else logps


def demo_tool_turns(tokenizer) -> ToolTurns:
    """The demo world's tools (add, weather: minimind.demo.tools), run between a rollout's turns."""
    from minimind.demo.tools import demo_tools, run_tool

    return ToolTurns(tokenizer, demo_tools(), run_tool)


def policy_to_train(job, stage, device) -> tuple[torch.nn.Module, LoRAConfig | None]:
    """The training loop's model (with fresh adapters for --lora-rank) as GRPO trains it: with dropout off
    (eval mode; TRL's GRPO disables dropout too), so that at unchanged weights every forward gives the same
    log-probabilities (with --lora-dropout 0.1 the ratios ranged 0.945 to 1.05) and the policy trained is
    the one the rollout actor samples; compiled with --compile."""
    model, lora = model_to_train(job, stage, device)
    model.eval()
    if job.config.compile:
        compile_for_training(model)
    return model, lora


def hand_over(model, whole: bool) -> dict[str, torch.Tensor]:
    """The policy's weights for the rollout actor, on the CPU: every tensor once (a tied head goes as the
    embedding it is), or with `whole` False only a LoRA policy's adapters."""
    if not whole:
        return adapter_state(model)
    return {name: tensor.detach().cpu() for name, tensor in unique_tensors(unwrap(model)).items()}


def micro_batches(rows: int, grad_accum: int) -> list[torch.Tensor]:
    """The row indices of each micro-batch of a step's `rows` completions."""
    return list(torch.arange(rows).chunk(grad_accum))


def score_before_update(model, reference, ids: torch.Tensor, labels: torch.Tensor, chunks: list[torch.Tensor], config,
                        amp_dtype=None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The old policy's log-probabilities (only with --updates-per-rollout above 1: with one update the
    policy's own, detached, are the old ones) and the reference's, at the sampling temperature, micro-batch
    by micro-batch as `update` scores them: the same shapes, so at unchanged weights the ratio is exactly 1."""
    old, ref = [], []
    with torch.no_grad(), autocast_to(ids.device, amp_dtype):
        for rows in chunks:
            if config.updates_per_rollout > 1:
                old.append(completion_logprobs(model, ids[rows], labels[rows], config.temperature))
            if reference is not None:
                ref.append(completion_logprobs(reference, ids[rows], labels[rows], config.temperature))
    return (torch.cat(old) if old else None), (torch.cat(ref) if ref else None)


def active_tokens(trained: torch.Tensor, world: int) -> torch.Tensor:
    """The completion tokens of the whole step on every rank, divided by the ranks (DDP averages the
    gradients over them): what CISPO's loss is divided by. One all-reduce, on the device, no host wait."""
    count = trained.sum().to(torch.float32)
    if world > 1:
        torch.distributed.all_reduce(count)
    return count.clamp(min=1.0) / world


def update(model, optimizer, params: list, ids: torch.Tensor, labels: torch.Tensor, advantages: torch.Tensor,
           old_logps: torch.Tensor | None, reference_logps: torch.Tensor | None, chunks: list[torch.Tensor], config,
           lrs: list[float], tokens: torch.Tensor | None = None, amp_dtype=None) -> dict:
    """--updates-per-rollout optimiser steps on one step's rollouts, each accumulated over `chunks`, at the
    learning rates `lrs`. The micro-batch losses add up to the batch's: grpo's per-completion means are
    summed and divided by the batch's completions, cispo's token sums by `tokens` (`active_tokens`; by
    default this rank's). Returns the metrics as tensors, averaged over the updates (train/loss, grpo/*,
    loss/aux for an MoE policy, the last update's train/grad_norm)."""
    trained = labels[:, 1:] != IGNORE_INDEX  # the tokens each log-prob row scores
    rows_total = ids.shape[0]
    if tokens is None:
        tokens = trained.sum().clamp(min=1).float()
    sums: dict = {}
    for lr in lrs:
        for group_ in optimizer.param_groups:
            group_["lr"] = lr
        for number, rows in enumerate(chunks):
            last = number == len(chunks) - 1
            with (
                model.no_sync() if not last and hasattr(model, "no_sync") else nullcontext(),
                autocast_to(ids.device, amp_dtype),
            ):
                logps, aux_loss = completion_logprobs(model, ids[rows], labels[rows], config.temperature, with_aux=True)
                loss, metrics = policy_loss(
                    logps,
                    old_logps[rows] if old_logps is not None else logps.detach(),
                    advantages[rows],
                    trained[rows],
                    clip_eps=config.clip_eps,
                    loss_type=config.loss_type,
                    max_ratio=config.cispo_max_ratio,
                    reference_logps=reference_logps[rows] if reference_logps is not None else None,
                    kl_coef=config.kl_coef,
                    completions=rows_total,
                    tokens=tokens,
                )
                if unwrap(model).config.is_moe:  # the router keeps its load balancing, as in every other stage
                    metrics["loss/aux"] = aux_loss.detach()
                    loss = loss + aux_loss * len(rows) / rows_total
                loss.backward()
            sums["train/loss"] = sums.get("train/loss", 0.0) + loss.detach() / len(lrs)
            for key, value in metrics.items():  # means over these rows, weighted by their share of the batch
                sums[key] = sums.get(key, 0.0) + value.detach() * len(rows) / rows_total / len(lrs)
        sums["train/grad_norm"] = optimiser_step(optimizer, params, config.grad_clip)
    return sums


def rollout_stats(
    totals: list[float],
    values: dict[str, list[float]],
    completions: list[list[int]],
    finished: list[bool],
    group_size: int,
    trained_tokens: int,
    device,
    world: int,
) -> tuple[dict[str, float], int]:
    """The step's rollout metrics over every rank's completions: reward/<name>/mean and std (the total and
    each reward), completion/length, completion/cut_off, grpo/equal_reward_groups; and the tokens trained
    on, all ranks together. Every rank calls it (one all-reduce of the sums, in float64)."""
    columns = {"reward/total": totals, **{f"reward/{name}": got for name, got in values.items()}}
    groups = torch.tensor(totals, dtype=torch.float64).view(-1, group_size)
    equal = int((groups.amax(dim=1) == groups.amin(dim=1)).sum())
    counts = [len(totals), sum(len(c) for c in completions), len(finished) - sum(finished), len(groups), equal, trained_tokens]
    moments = [m for got in columns.values() for m in (sum(got), sum(x * x for x in got))]
    summed = torch.tensor(counts + moments, dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.all_reduce(summed)
    summed = summed.tolist()
    n, lengths, cut, group_count, equal, tokens = summed[:6]
    stats = {"completion/length": lengths / n, "completion/cut_off": cut / n, "grpo/equal_reward_groups": equal / group_count}
    for index, prefix in enumerate(columns):
        total, squares = summed[6 + 2 * index : 8 + 2 * index]
        mean = total / n
        stats[f"{prefix}/mean"], stats[f"{prefix}/std"] = mean, max(squares / n - mean * mean, 0.0) ** 0.5
    return stats, int(tokens)


def start_rollout_actor(job, model, lora, device, amp_dtype, rank: int):
    """The Ray actor that samples this worker's completions (minimind.rl.rollout), once it has its resources."""
    import ray

    config = job.config
    rollout_gpus = config.rollout_gpus if device.type == "cuda" else 0
    rollout = (
        ray.remote(RolloutWorker)
        .options(num_cpus=config.rollout_cpus, num_gpus=rollout_gpus)
        .remote(unwrap(model).config.to_dict(), lora, threads=max(1, int(config.cpus_per_worker)), bf16=amp_dtype is not None)
    )
    ready, _ = ray.wait([rollout.__ray_ready__.remote()], timeout=60)
    if not ready:  # outside Ray Train's placement group: it waits for free resources, maybe a node the autoscaler adds
        say(
            f"[{job.stage.name}] rank {rank}: the rollout actor is still waiting for "
            f"{config.rollout_cpus:g} CPU and {rollout_gpus:g} GPU; "
            "on one GPU, trainer and actors must fit it together (--gpus-per-worker 0.5 --rollout-gpus 0.5 per worker)"
        )
        ray.get(rollout.__ray_ready__.remote())
    return rollout


def roll_out(rollout, prompts: list[Prompt], version: int, config, eos_id: int, seed: int, tool_turns=None
             ) -> tuple[list[list[int]], list[bool], list[list[tuple[int, int]]]]:
    """--group-size sampled completions of every prompt from the actor holding weights `version`, which of
    them ended with the stop token, and the spans the tools wrote into each (with `tool_turns`)."""
    import ray

    sampling = {
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "stop_token_ids": [eos_id],
        "seed": seed,
    }
    generated = ray.get(rollout.generate.remote([p.ids for p in prompts], config.group_size, sampling, tool_turns))
    if generated["version"] != version:
        raise RuntimeError(f"rollouts of weights version {generated['version']}, expected {version}")
    return generated["completions"], generated["finished"], generated["inserted"]


@dataclass
class Scored:
    """One step's rollouts, scored and ready for the update."""

    ids: torch.Tensor  # prompt + completion rows, on the device
    labels: torch.Tensor  # the completion tokens the policy trains on; -100 elsewhere
    trained_tokens: int
    totals: list[float]  # each completion's total reward
    values: dict[str, list[float]]  # each reward's values
    advantages: torch.Tensor
    chunks: list[torch.Tensor]  # the rows of each micro-batch
    old_logps: torch.Tensor | None
    reference_logps: torch.Tensor | None


def policy_turns(completion: list[int], inserted: list[tuple[int, int]]) -> list[list[int]]:
    """A multi-turn completion cut into the policy's turns, each without the end-of-turn token that closes it
    (the one just before each span the tools wrote)."""
    turns, start = [], 0
    for span_start, span_end in inserted:
        turns.append(completion[start : span_start - 1])
        start = span_end
    return turns + [completion[start:]]


def score_rollouts(prompts: list[Prompt], completions: list[list[int]], finished: list[bool], model, reference, scorer,
                   tokenizer, markers: Markers, weights: dict, config, device, amp_dtype,
                   inserted: list[list[tuple[int, int]]] | None = None) -> Scored:
    """Rewards (and the reward model's score, if any), advantages within each group, and the old policy's
    and the reference's log-probabilities (score_before_update)."""
    group = config.group_size
    ids, labels = sequences(prompts, completions, finished, group, tokenizer.eos_token_id, tokenizer.pad_token_id,
                            inserted)
    trained_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    ids, labels = ids.to(device), labels.to(device)
    texts = [tokenizer.decode(c, skip_special_tokens=False) for c in completions]
    turns = [tuple(tokenizer.decode(turn, skip_special_tokens=False) for turn in policy_turns(c, inserted[i]))
             if inserted else () for i, c in enumerate(completions)]
    results = [tuple(r for start, end in inserted[i] for r in tool_results(tokenizer.decode(c[start:end])))
               if inserted else () for i, c in enumerate(completions)]
    scored = [
        Completion(prompts[i // group].opening + t, len(c), f, prompts[i // group].reference, turns[i],
                   prompts[i // group].turns, results[i])
        for i, (t, c, f) in enumerate(zip(texts, completions, finished))
    ]
    model_scores = None
    if scorer is not None:
        with torch.no_grad(), autocast_to(device, amp_dtype):
            hidden = scorer(ids, return_logits=False).hidden_states
            model_scores = sequence_logprobs(hidden, scorer.lm_head.weight, labels).tolist()
    totals, values = score(scored, weights, markers, config.length_limit, model_scores)
    advantages = group_advantages(torch.tensor(totals, dtype=torch.float64), group).to(device)
    chunks = micro_batches(ids.shape[0], config.grad_accum)
    old_logps, reference_logps = score_before_update(model, reference, ids, labels, chunks, config, amp_dtype)
    return Scored(ids, labels, trained_tokens, totals, values, advantages, chunks, old_logps, reference_logps)


def update_lrs(step: int, total_steps: int, config) -> list[float]:
    """The learning rate of each of a step's --updates-per-rollout optimiser steps, on one cosine schedule."""
    updates = config.updates_per_rollout
    return [
        cosine_lr(step * updates + u, total_steps * updates, config.lr, config.warmup_steps, config.min_lr_ratio)
        for u in range(updates)
    ]


def grpo_loop_per_worker(loop_config: dict) -> None:
    """`loop_config["job"]` is the driver's `StageJob` with a `GRPOConfig`."""
    import ray
    import ray.train
    from ray.train.torch import prepare_model

    job = loop_config["job"]
    config, stage = job.config, job.stage
    worker = start_worker(job)
    rank, world, device, tokenizer = worker.rank, worker.world, worker.device, worker.tokenizer
    markers = Markers.of(tokenizer)
    model, lora = policy_to_train(job, stage, device)
    reference = load_frozen(job.init_dir, device) if config.kl_coef > 0 else None
    scorer = load_frozen(job.reward_model_dir, device) if job.reward_model_dir else None
    weights = parse_weights(config.rewards)
    checked = "answer" in weights and MODEL_REWARD not in weights
    tool_turns = demo_tool_turns(tokenizer) if config.tools else None
    if tool_turns:
        prompts = tool_prompts(PreparedRows(job.data_path), tokenizer)
    else:
        prompts = training_prompts(PreparedRows(job.data_path), tokenizer, markers, keep_all=not checked)
    if not prompts:
        raise ValueError(
            f"{job.data_path}: no record has a reference reply in <think>/<answer> form to reward answers against "
            "(add a model reward with --reward-model to train on plain chats)"
        )
    total_steps = config.max_steps or config.epochs * max(1, len(prompts) // (config.batch_size * world))
    params, optimizer = adamw(model, config, device)

    step = resume_from_checkpoint(job, stage, model, optimizer, lora, device, rank)

    model = prepare_model(model, parallel_strategy_kwargs=ddp_options())
    amp_dtype = autocast_dtype(config, device)
    eos_id = tokenizer.eos_token_id  # the end of a chat turn: the one stop token, appended to finished completions
    rollout = start_rollout_actor(job, model, lora, device, amp_dtype, rank)
    tools_for_rollouts = ray.put(tool_turns) if tool_turns else None  # sent once: the tokenizer and the tools
    logger = MetricLogger(job, total_steps) if rank == 0 else None
    peak = peak_flops(device, amp_dtype or torch.float32)[0] if rank == 0 else 0.0
    flops_per_token = 6 * unwrap(model).num_parameters(active=True)
    if rank == 0:
        say(
            f"[{job.stage.name}] {len(prompts)} prompts, {config.batch_size} x {config.group_size} completions per step and "
            f"worker, {total_steps} steps"
        )
        dropout = {"dropout": unwrap(model).config.dropout, "--lora-dropout": lora.dropout if lora else 0.0}
        if any(dropout.values()):
            say(
                f"[{job.stage.name}] trained with dropout off ("
                + ", ".join(f"{k} {v:g}" for k, v in dropout.items() if v)
                + "): the ratios and the rollouts need the one policy that samples"
            )
    started, handed_over = time.perf_counter(), 0
    try:
        while step < total_steps:
            batch = step_prompts(prompts, step, config.batch_size, rank, world, config.seed)

            clock = time.perf_counter()  # hand_over: a LoRA policy's base goes over once, then only its adapters
            weights_now = hand_over(model, whole=not lora or handed_over == 0)
            handed_over += 1
            version = ray.get(rollout.load_weights.remote(ray.put(weights_now), step))
            handover_s = time.perf_counter() - clock

            seed = (config.seed * 1_000_003 + step) * world + rank
            completions, finished, inserted = roll_out(rollout, batch, version, config, eos_id, seed, tools_for_rollouts)
            rollout_s = time.perf_counter() - clock - handover_s

            scored = score_rollouts(batch, completions, finished, model, reference, scorer, tokenizer, markers, weights,
                                    config, device, amp_dtype, inserted if tool_turns else None)

            clock = time.perf_counter()
            lrs = update_lrs(step, total_steps, config)
            tokens = active_tokens(scored.labels[:, 1:] != IGNORE_INDEX, world) if config.loss_type == "cispo" else None
            sums = update(model, optimizer, params, scored.ids, scored.labels, scored.advantages, scored.old_logps,
                          scored.reference_logps, scored.chunks, config, lrs, tokens, amp_dtype)
            update_s = time.perf_counter() - clock
            step += 1

            # report
            events = StepEvents.after(step, total_steps, config)
            if events.logging or events.checkpointing or events.validating:  # on every rank: the statistics cross the ranks
                stats, all_tokens = rollout_stats(scored.totals, scored.values, completions, finished, config.group_size,
                                                  scored.trained_tokens, device, world)
                reported = {"train/loss": float(sums["train/loss"]), "reward/total/mean": stats["reward/total/mean"]}
            if logger and events.logging:
                tokens_per_s = all_tokens * config.updates_per_rollout / max(update_s, 1e-9)
                report = (
                    {key: float(value) for key, value in sums.items()}
                    | stats
                    | {
                        "train/lr": lrs[-1],
                        "train/tokens_per_s": tokens_per_s,
                        "train/mfu": flops_per_token * tokens_per_s / world / peak,
                        "time/handover_s": handover_s,
                        "time/rollout_s": rollout_s,
                        "time/update_s": update_s,
                        "rollout/handover_mb": sum(v.numel() * v.element_size() for v in weights_now.values()) / 2**20,
                    }
                )
                logger.log(step, report, time.perf_counter() - started)
                say(
                    f"[{job.stage.name}] step {step}: reward {report['reward/total/mean']:.3f} ± {report['reward/total/std']:.3f}"
                    f" | "
                    + " | ".join(f"{name} {report[f'reward/{name}/mean']:.3f}" for name in scored.values)
                    + f" | kl {report['grpo/kl']:.4f} | rollout {rollout_s:.1f}s, update {update_s:.1f}s, "
                    f"hand-over {handover_s * 1e3:.0f} ms"
                )
            if events.checkpointing or events.validating:
                validate_and_report(events, step, total_steps, reported, job, worker, model, optimizer, lora, logger)
            if events.stopping:
                break
    finally:
        ray.kill(rollout)
        if logger:
            logger.close()
