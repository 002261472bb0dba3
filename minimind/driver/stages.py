"""Every training stage and every fact about it, in one table: its data kind, registered model, the
stage it starts from, its settings class, the demo world's file, the loop its workers run, what it is
evaluated on and which settings it refuses. Nothing else switches on a stage's name."""

from __future__ import annotations

from pathlib import Path

from minimind.driver.evaluate import (
    answer_exact_match,
    image_question_accuracy,
    pair_logps,
    preference_wins,
    reasoning_scores,
    text_replier,
    tool_use_scores,
    vlm_replier,
)
from minimind.model.vision import PROJECTORS
from minimind.rl.grpo import grpo_loop_per_worker
from minimind.rl.rewards import MODEL_REWARD, parse_weights
from minimind.training.configs import (
    DistillConfig,
    DPOConfig,
    GRPOConfig,
    PretrainConfig,
    SFTConfig,
    ToolsConfig,
    TrainConfig,
    VLMConfig,
    VLMSFTConfig,
)
from minimind.training.heldout import heldout_loss
from minimind.training.loop import train_loop_per_worker
from minimind.training.stages import DPOStage, KDStage, Stage, VLMStage


def with_tasks(name: str, result: dict) -> dict:
    """An accuracy as metric `name`, and its value within each task of the held-out file as `name/task`."""
    return {name: result["accuracy"]} | {f"{name}/{task}": value for task, value in result.get("by_task", {}).items()}


def _loss(stage, model, tokenizer, eval_path: Path, limit: int, seq_len: int, images_dir) -> dict:
    return {"eval/heldout_loss": heldout_loss(model, tokenizer, eval_path, kind=stage.data_kind, seq_len=seq_len, limit=limit,
                                              images_dir=images_dir)}


def _kept_answers(model, tokenizer, answer_path: Path | None, limit: int) -> dict:
    """What a later stage must not make the model forget: the SFT answers."""
    if answer_path is None:
        return {}
    return with_tasks("eval/answer_exact_match", answer_exact_match(text_replier(model, tokenizer), answer_path, limit))


def _text_samples(result: dict) -> list[dict]:
    return [{"prompt": conversation[-1]["content"], "reply": reply} for conversation, reply, *_ in result["samples"]]


def evaluate_text(stage, model, tokenizer, eval_path, limit, seq_len, reference=None, images_dir=None, answer_path=None):
    """Pretraining: the held-out text's cross-entropy alone."""
    return _loss(stage, model, tokenizer, eval_path, limit, seq_len, images_dir), []


def evaluate_answers(stage, model, tokenizer, eval_path, limit, seq_len, reference=None, images_dir=None, answer_path=None):
    """SFT: what the greedy replies get right."""
    result = answer_exact_match(text_replier(model, tokenizer), eval_path, limit)
    metrics = _loss(stage, model, tokenizer, eval_path, limit, seq_len, images_dir) | with_tasks(
        "eval/answer_exact_match", result
    )
    return metrics, _text_samples(result)


def evaluate_preferences(stage, model, tokenizer, eval_path, limit, seq_len, reference=None, images_dir=None, answer_path=None):
    """DPO: the implicit reward against `reference` (its starting model), and the SFT answers it must keep."""
    policy = pair_logps(model, tokenizer, eval_path, seq_len=seq_len, limit=limit)  # once, for both views below
    own = preference_wins(*policy)
    implicit = {}
    if reference is not model:
        reference_chosen, reference_rejected = pair_logps(reference, tokenizer, eval_path, seq_len=seq_len, limit=limit)
        implicit = preference_wins(policy[0] - reference_chosen, policy[1] - reference_rejected, with_drift=True)
    metrics = {
        "eval/preference_accuracy": own["accuracy"],
        "eval/rewards_accuracy": implicit.get("accuracy", 0.0),  # all 0 before training: policy == reference
        "eval/rewards_margin": implicit.get("margin", 0.0),
        "eval/drift": implicit.get("drift", 0.0),
    }
    return metrics | _kept_answers(model, tokenizer, answer_path, limit), []


def evaluate_reasoning(stage, model, tokenizer, eval_path, limit, seq_len, reference=None, images_dir=None, answer_path=None):
    """Reasoning (distilled, KD or GRPO): the <think>/<answer> form and the answers, and the SFT answers it must keep."""
    replier = text_replier(model, tokenizer, max_new_tokens=160, whole_reply=True, thinking=True)  # reasoning asked for
    result = reasoning_scores(replier, eval_path, tokenizer, limit)
    metrics = (
        _loss(stage, model, tokenizer, eval_path, limit, seq_len, images_dir)
        | {"eval/reasoning_format": result["format"]}
        | with_tasks("eval/reasoning_accuracy", result)
        | _kept_answers(model, tokenizer, answer_path, limit)
    )
    return metrics, _text_samples(result)


def evaluate_tool_use(stage, model, tokenizer, eval_path, limit, seq_len, reference=None, images_dir=None, answer_path=None):
    """Tool calling: the call when a tool is needed, none when not, the answer from a tool's result, and the SFT
    answers it must keep."""
    result = tool_use_scores(model, tokenizer, eval_path, limit)
    metrics = _loss(stage, model, tokenizer, eval_path, limit, seq_len, images_dir) | {
        "eval/tool_call_accuracy": result["call"],
        "eval/no_call_accuracy": result["no_call"],
        "eval/tool_answer_accuracy": result["answer"],
    }
    samples = [{"prompt": conversation[-1]["content"], "reply": reply} for conversation, reply in result["samples"]]
    return metrics | _kept_answers(model, tokenizer, answer_path, limit), samples


def evaluate_pictures(stage, model, tokenizer, eval_path, limit, seq_len, reference=None, images_dir=None, answer_path=None):
    """MiniMind-V: what the replies about held-out pictures get right."""
    result = image_question_accuracy(vlm_replier(model, tokenizer), eval_path, images_dir, limit)
    metrics = _loss(stage, model, tokenizer, eval_path, limit, seq_len, images_dir) | with_tasks(
        "eval/image_question_accuracy", result
    )
    samples = [
        {
            "image": ", ".join(str(p) for p in images),
            "prompt": conversation[-1]["content"],
            "reply": reply,
            "reference": reference,
        }
        for (conversation, images), reply, reference in result["samples"]
    ]
    return metrics, samples


def check_grpo_flags(config) -> None:
    """GRPO settings that cannot work, refused before anything runs."""
    try:
        weights = parse_weights(config.rewards)
    except ValueError as error:
        raise SystemExit(f"--rewards: {error}") from None
    if (MODEL_REWARD in weights) != bool(config.reward_model):
        raise SystemExit(
            "the model reward and --reward-model go together: name the model whose score is the reward, and "
            f"give it a weight in --rewards (e.g. {config.rewards},model=1)"
        )
    if config.tools not in (None, "demo"):
        raise SystemExit(f"--tools: only `demo` (the demo world's add and weather, minimind/demo/tools.py) runs in "
                         f"rollouts, not {config.tools!r}")
    if config.group_size < 2:
        raise SystemExit(
            f"--group-size must be at least 2 (advantages compare the completions of a prompt), not {config.group_size}"
        )
    if config.loss_type not in ("grpo", "cispo"):
        raise SystemExit(f"--loss-type must be grpo or cispo, not {config.loss_type!r}")
    if config.updates_per_rollout < 1 or config.max_new_tokens < 1:
        raise SystemExit("--updates-per-rollout and --max-new-tokens must be at least 1")
    if not config.temperature > 0 or not 0 < config.top_p <= 1:  # written so that NaN fails too
        raise SystemExit(
            "--temperature must be above 0 (greedy completions of a prompt are all alike: no advantage) and --top-p in (0, 1]"
        )
    if not config.cispo_max_ratio > 1:
        raise SystemExit(f"--cispo-max-ratio caps CISPO's importance weights: it must be above 1, not {config.cispo_max_ratio:g}")
    if config.loader_workers != TrainConfig.loader_workers:
        raise SystemExit(
            "--loader-workers: GRPO has no data loader to run (its prompts are read once, its completions come from "
            "the rollout actor, see --rollout-cpus); leave it out"
        )


def check_vlm_flags(config) -> None:
    """VLM settings that cannot work, refused before anything runs."""
    if config.projector not in PROJECTORS:
        raise SystemExit(f"--projector must be one of {', '.join(PROJECTORS)}, not {config.projector!r}")
    if config.train_llm not in ("none", "all", "first-last"):
        raise SystemExit(f"--train-llm must be none, all or first-last, not {config.train_llm!r}")
    if config.image_tokens < 0:
        raise SystemExit(f"--image-tokens must be 0 (one per patch) or a square number such as 64, not {config.image_tokens}")


def _table(*stages: Stage) -> dict[str, Stage]:
    return {stage.name: stage for stage in stages}


# demo_steps_per_epoch: what `jobs/pipeline.py --scale` counts from
STAGES = _table(
    Stage("pretrain", "pretrain", registered_name="minimind-pretrain", previous=None, config_class=PretrainConfig,
          demo_file="pretrain", demo_steps_per_epoch=71, loop=train_loop_per_worker, evaluate=evaluate_text),
    Stage("sft", "sft", registered_name="minimind-sft", previous="minimind-pretrain", config_class=SFTConfig,
          demo_file="sft", demo_steps_per_epoch=113, loop=train_loop_per_worker, evaluate=evaluate_answers),
    DPOStage("dpo", "dpo", registered_name="minimind-dpo", previous="minimind-sft", config_class=DPOConfig,
             demo_file="dpo", demo_steps_per_epoch=110, loop=train_loop_per_worker, evaluate=evaluate_preferences,
             keeps_answers=True),
    # black-box distillation: SFT on the teacher's traces
    Stage("reason", "reason", registered_name="minimind-reason", previous="minimind-dpo", config_class=DistillConfig,
          demo_file="reason", demo_steps_per_epoch=130, loop=train_loop_per_worker, evaluate=evaluate_reasoning,
          keeps_answers=True),
    # tool calling: SFT on chats that call the demo's tools (and questions that need none), from the reasoning model
    Stage("tools", "sft", registered_name="minimind-tools", previous="minimind-reason", config_class=ToolsConfig,
          demo_file="tools", demo_steps_per_epoch=108, loop=train_loop_per_worker, evaluate=evaluate_tool_use,
          keeps_answers=True),
    # white-box distillation: the teacher's soft labels (registers as the reasoning model too)
    KDStage("kd", "sft", registered_name="minimind-reason", previous="minimind-dpo", config_class=DistillConfig,
            demo_file="reason", loop=train_loop_per_worker, evaluate=evaluate_reasoning),
    # rewards: prompts of the reasoning kind, rolled out, scored and learned from by its own loop
    Stage("grpo", "reason", registered_name="minimind-grpo", previous="minimind-reason", config_class=GRPOConfig,
          demo_file="reason", loop=grpo_loop_per_worker, evaluate=evaluate_reasoning, check=check_grpo_flags,
          keeps_answers=True),
    # agentic RL (`jobs/grpo.py --tools demo`): the tools run between a rollout's turns; the call and the reply rewarded
    Stage("grpo_tools", "sft", registered_name="minimind-grpo-tools", previous="minimind-tools", config_class=GRPOConfig,
          demo_file="tools_rl", loop=grpo_loop_per_worker, evaluate=evaluate_tool_use, check=check_grpo_flags,
          keeps_answers=True),
    # MiniMind-V: the projection alone trains, then the projection and the language model (--train-llm)
    VLMStage("vlm_pretrain", "vlm", registered_name="minimind-vlm-pretrain", previous="minimind-sft", config_class=VLMConfig,
             demo_file="vlm_pretrain", demo_steps_per_epoch=138, loop=train_loop_per_worker, evaluate=evaluate_pictures,
             check=check_vlm_flags),
    VLMStage("vlm_sft", "vlm", registered_name="minimind-vlm-sft", previous="minimind-vlm-pretrain", config_class=VLMSFTConfig,
             demo_file="vlm_sft", demo_steps_per_epoch=138, loop=train_loop_per_worker, evaluate=evaluate_pictures,
             check=check_vlm_flags),
)
