"""GRPO: reinforcement learning from rewards, the loop each Ray Train worker of `jobs/grpo.py` runs.

Every step, on each worker:

    its prompts --policy weights through Ray's object store--> rollout actor (minimind.rollout):
    G sampled completions per prompt --rewards (minimind.rewards)--> advantages within each group
    --policy forward--> clipped policy-gradient loss + KL to the frozen starting model --> AdamW update(s)

The rest is the one training loop's (minimind.train): the schedule, DDP, checkpoints with optimiser,
step and RNG state (a resumed run samples the same completions), the step line and MLflow metrics.
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

from minimind.data import _pad
from minimind.flops import peak_flops
from minimind.losses import IGNORE_INDEX, group_advantages, policy_loss, sequence_logprobs, token_logprobs
from minimind.rewards import MODEL_REWARD, Completion, parse_weights, reasoning_parts, score
from minimind.stages import STAGES, _frozen, unwrap
from minimind.tokenizer import Markers
from minimind.train import (
    _MetricLogger, _report_checkpoint, _say, adamw, autocast_dtype, cosine_lr, ddp_options, model_to_train, resume_from_checkpoint,
)


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    reference: str | None  # the record's last reply, decoded


def training_prompts(rows, tokenizer, markers: Markers, keep_all: bool) -> list[Prompt]:
    """The prompt and reference reply of every prepared chat row: the reply is the row's last run of
    labelled tokens (its end-of-turn token dropped), the prompt everything before it."""
    prompts = []
    for index in range(len(rows)):
        row = rows[index]
        labelled = [i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX]
        if not labelled:
            continue
        start = labelled[-1]
        while start > 0 and row["labels"][start - 1] != IGNORE_INDEX:
            start -= 1
        reply = list(row["input_ids"][start : labelled[-1] + 1])
        while reply and reply[-1] == tokenizer.eos_token_id:
            reply.pop()
        reference = tokenizer.decode(reply, skip_special_tokens=False)
        if keep_all or reasoning_parts(reference, markers):
            prompts.append(Prompt(list(row["input_ids"][:start]), reference))
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
              eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + completion rows, right-padded, and their labels: the completion tokens (with the stop
    token of a completion that ended), the tokens the policy is trained on; -100 elsewhere."""
    rows, labels = [], []
    for i, completion in enumerate(completions):
        prompt = prompts[i // group_size].ids
        reply = completion + ([eos_id] if finished[i] else [])
        rows.append(prompt + reply)
        labels.append([IGNORE_INDEX] * len(prompt) + reply)
    width = max(len(row) for row in rows)
    return _pad(rows, pad_id, width), _pad(labels, IGNORE_INDEX, width)


def completion_logprobs(model, ids: torch.Tensor, labels: torch.Tensor, with_aux: bool = False):
    """Log-probability of every completion token under `model` (rows, length - 1); 0 elsewhere. With
    `with_aux`, also the forward's MoE load-balancing loss (0 for a dense model)."""
    output = model(ids, return_logits=False)
    logps = token_logprobs(output.hidden_states, unwrap(model).lm_head.weight, labels)
    return (logps, output.aux_loss) if with_aux else logps


def _stats(prefix: str, values: list[float]) -> dict[str, float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    return {f"{prefix}/mean": float(tensor.mean()), f"{prefix}/std": float(tensor.std(unbiased=False))}


def grpo_loop_per_worker(loop_config: dict) -> None:
    """`loop_config["job"]` is the driver's `StageJob` with a `GRPOConfig`."""
    import ray
    import ray.train
    from ray.train.torch import get_device, prepare_model

    from minimind.lora import adapter_state
    from minimind.rollout import RolloutWorker
    from minimind.shards import PreparedRows
    from minimind.tokenizer import load_tokenizer

    job = loop_config["job"]
    config = job.config
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = get_device()
    stage = STAGES[job.stage]
    threads = max(1, int(config.cpus_per_worker))
    torch.set_num_threads(threads)
    random.seed(config.seed + rank)
    torch.manual_seed(config.seed + rank)

    job.fetch_inputs()
    tokenizer = load_tokenizer(job.init_dir)
    markers = Markers.of(tokenizer)
    model, lora = model_to_train(job, stage, device)
    reference = _frozen(job.init_dir, device) if config.kl_coef > 0 else None
    scorer = _frozen(job.reward_model_dir, device) if job.reward_model_dir else None
    weights = parse_weights(config.rewards)
    checked = "answer" in weights and MODEL_REWARD not in weights
    prompts = training_prompts(PreparedRows(job.data_path), tokenizer, markers, keep_all=not checked)
    if not prompts:
        raise ValueError(f"{job.data_path}: no record has a reference reply in <think>/<answer> form to reward answers against "
                         "(add a model reward with --reward-model to train on plain chats)")
    group = config.group_size
    total_steps = config.max_steps or config.epochs * max(1, len(prompts) // (config.batch_size * world))
    params, optimizer = adamw(model, config, device)

    step = resume_from_checkpoint(job, stage, model, optimizer, lora, device, rank)

    model = prepare_model(model, parallel_strategy_kwargs=ddp_options())
    amp_dtype = autocast_dtype(config, device)
    eos_id = tokenizer.eos_token_id  # the end of a chat turn: the one stop token, appended to finished completions
    rollout_gpus = config.rollout_gpus if device.type == "cuda" else 0
    rollout = ray.remote(RolloutWorker).options(num_cpus=config.rollout_cpus, num_gpus=rollout_gpus).remote(
        unwrap(model).config.to_dict(), lora, threads=threads, bf16=amp_dtype is not None)
    ready, _ = ray.wait([rollout.__ray_ready__.remote()], timeout=60)
    if not ready:  # outside Ray Train's placement group: it waits for free resources, maybe a node the autoscaler adds
        _say(f"[{job.stage}] rank {rank}: the rollout actor is still waiting for {config.rollout_cpus:g} CPU and {rollout_gpus:g} GPU; "
             "on one GPU, trainer and actors must fit it together (--gpus-per-worker 0.5 --rollout-gpus 0.5 per worker)")
        ray.get(rollout.__ray_ready__.remote())
    logger = _MetricLogger(job, total_steps) if rank == 0 else None
    peak = peak_flops(device, amp_dtype or torch.float32)[0] if rank == 0 else 0.0
    flops_per_token = 6 * unwrap(model).num_parameters(active=True)
    if rank == 0:
        _say(f"[{job.stage}] {len(prompts)} prompts, {config.batch_size} x {group} completions per step and worker, {total_steps} steps")
    started, handed_over = time.perf_counter(), 0
    try:
        while step < total_steps:
            batch = step_prompts(prompts, step, config.batch_size, rank, world, config.seed)

            # the policy's weights to the rollout actor, through the object store
            clock = time.perf_counter()
            whole = not lora or handed_over == 0  # a LoRA policy's base goes over once, then only its adapters
            weights_now = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()} if whole else adapter_state(model)
            handed_over += 1
            version = ray.get(rollout.load_weights.remote(ray.put(weights_now), step))
            handover_s = time.perf_counter() - clock
            sampling = {"max_new_tokens": config.max_new_tokens, "temperature": config.temperature, "top_p": config.top_p,
                        "stop_token_ids": [eos_id], "seed": (config.seed * 1_000_003 + step) * world + rank}
            generated = ray.get(rollout.generate.remote([p.ids for p in batch], group, sampling))
            if generated["version"] != version:
                raise RuntimeError(f"rollouts of weights version {generated['version']}, expected {version}")
            rollout_s = time.perf_counter() - clock - handover_s
            completions, finished = generated["completions"], generated["finished"]

            # rewards and advantages
            ids, labels = sequences(batch, completions, finished, group, eos_id, tokenizer.pad_token_id)
            ids, labels = ids.to(device), labels.to(device)
            trained = labels[:, 1:] != IGNORE_INDEX  # the tokens each log-prob row scores
            texts = [tokenizer.decode(c, skip_special_tokens=False) for c in completions]
            scored = [Completion(t, len(c), f, batch[i // group].reference) for i, (t, c, f) in enumerate(zip(texts, completions, finished))]
            with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                model_scores = None
                if scorer is not None:
                    model_scores = sequence_logprobs(scorer(ids, return_logits=False).hidden_states, scorer.lm_head.weight, labels).tolist()
                reference_logps = completion_logprobs(reference, ids, labels) if reference is not None else None
                old_logps = completion_logprobs(model, ids, labels) if config.updates_per_rollout > 1 else None
            totals, values = score(scored, weights, markers, config.length_limit, model_scores)
            advantages = group_advantages(torch.tensor(totals), group).to(device)

            # the update(s)
            clock = time.perf_counter()
            sums: dict = {}
            chunks = torch.arange(ids.shape[0]).chunk(config.grad_accum)
            for update in range(config.updates_per_rollout):
                lr = cosine_lr(step * config.updates_per_rollout + update, total_steps * config.updates_per_rollout,
                               config.lr, config.warmup_steps, config.min_lr_ratio)
                for group_ in optimizer.param_groups:
                    group_["lr"] = lr
                for number, rows in enumerate(chunks):
                    last = number == len(chunks) - 1
                    with (model.no_sync() if not last and hasattr(model, "no_sync") else nullcontext()), torch.autocast(
                        device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
                    ):
                        logps, aux_loss = completion_logprobs(model, ids[rows], labels[rows], with_aux=True)
                        loss, metrics = policy_loss(
                            logps, old_logps[rows] if old_logps is not None else logps.detach(), advantages[rows], trained[rows],
                            clip_eps=config.clip_eps, loss_type=config.loss_type,
                            reference_logps=reference_logps[rows] if reference_logps is not None else None, kl_coef=config.kl_coef,
                        )
                        if unwrap(model).config.is_moe:  # the router keeps its load balancing, as in every other stage
                            metrics["loss/aux"] = aux_loss.detach()
                            loss = loss + aux_loss
                        (loss * len(rows) / ids.shape[0]).backward()
                    share = len(rows) / ids.shape[0] / config.updates_per_rollout
                    for key, value in {"train/loss": loss.detach(), **metrics}.items():
                        sums[key] = sums.get(key, 0.0) + value.detach() * share
                grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sums["train/grad_norm"] = grad_norm
            update_s = time.perf_counter() - clock
            step += 1

            if logger and (step % config.log_every == 0 or step == total_steps or step == 1):
                trained_tokens = int(trained.sum()) * config.updates_per_rollout
                report = {key: float(value) for key, value in sums.items()} | _stats("reward/total", totals)
                for name, got in values.items():
                    report |= _stats(f"reward/{name}", got)
                groups = torch.tensor(totals).view(-1, group)
                report |= {
                    "train/lr": lr, "train/tokens_per_s": trained_tokens / max(update_s, 1e-9),
                    "train/mfu": flops_per_token * trained_tokens / max(update_s, 1e-9) / peak,
                    "completion/length": sum(len(c) for c in completions) / len(completions),
                    "completion/cut_off": 1 - sum(finished) / len(finished),
                    "grpo/equal_reward_groups": float((groups.max(1).values == groups.min(1).values).float().mean()),
                    "time/handover_s": handover_s, "time/rollout_s": rollout_s, "time/update_s": update_s,
                    "rollout/handover_mb": sum(v.numel() * v.element_size() for v in weights_now.values()) / 2**20,
                }
                logger.log(step, report, time.perf_counter() - started)
                _say(f"[{job.stage}] step {step}: reward {report['reward/total/mean']:.3f} ± {report['reward/total/std']:.3f}"
                     f" | " + " | ".join(f"{name} {report[f'reward/{name}/mean']:.3f}" for name in values)
                     + f" | kl {report['grpo/kl']:.4f} | rollout {rollout_s:.1f}s, update {update_s:.1f}s, hand-over {handover_s * 1e3:.0f} ms")
            stopping = bool(config.stop_after) and config.stop_after <= step < total_steps
            if step % config.checkpoint_every == 0 or step == total_steps or stopping:
                _report_checkpoint(stage, model, tokenizer, optimizer, step, {"train/loss": float(sums["train/loss"]),
                                   "reward/total/mean": sum(totals) / len(totals), "finished": float(step == total_steps)}, rank, world, lora)
            if stopping:
                break
    finally:
        ray.kill(rollout)
        if logger:
            logger.close()
