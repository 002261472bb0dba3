"""What differs between training stages on a worker: the data kind, the loss, and any frozen companion
model. Everything else (optimiser, schedule, precision, checkpoints, reporting) is the one loop in
minimind.training.loop; the table of stages, with what the driver needs of each, is minimind.driver.stages.

Right-padded batches need no attention mask in a causal model (real tokens never look ahead at the
padding), so the losses below skip it and keep attention on its fast path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from minimind.model.checkpoint import load_model, save_model
from minimind.model.losses import IGNORE_INDEX, sequence_logprobs
from minimind.model.model import unwrap
from minimind.model.vision import load_vlm, save_vlm
from minimind.training.losses import dpo_loss, kd_loss


@dataclass(frozen=True)
class Stage:
    name: str  # the job and the run name prefix
    data_kind: str  # minimind.data.rows kind
    registered_name: str  # MLflow registered model of its result
    previous: str | None  # registered model the stage starts from by default; None: it can start from scratch
    config_class: type  # its settings (minimind.training.configs), hence its job's flags
    demo_file: str  # the demo world's training file (and `<demo_file>_eval`, its held-out one)
    loop: Callable  # the function every Ray Train worker runs
    evaluate: Callable  # (stage, model, tokenizer, eval_path, limit, seq_len, ...) -> (metrics, samples)
    check: Callable | None = None  # refuses settings that cannot work, before anything runs
    keeps_answers: bool = False  # also scored on the SFT answers it must not forget
    demo_steps_per_epoch: int = 0  # optimiser steps in an epoch of the demo file at the settings' default batch size

    normalised_over = "supervised tokens"  # what `loss` is a mean over (`loss_count` counts them in a batch)
    needs_teacher = False  # a frozen teacher model (--teacher) besides the one being trained

    def load(self, directory, device, config=None):
        """The model to train, its trainable parameters marked with requires_grad (by the job's settings
        `config`, where a stage has a choice)."""
        return load_model(directory, device=device)

    def save(self, model, directory, tokenizer) -> None:
        save_model(unwrap(model), directory, tokenizer=tokenizer)

    def companions(self, job, device) -> dict:
        """Frozen models the loss needs besides the one being trained (`job`: the worker's train.StageJob)."""
        return {}

    def model_inputs(self, model, batch: dict, job) -> dict:
        """Forward arguments besides the tokens (a VLM's pixels)."""
        return {}

    def loss_count(self, batch: dict) -> torch.Tensor:
        """How many of what `loss` is a mean over the batch holds, as a tensor on the batch's device (no
        wait for it): here the supervised next-token targets. The reasoning loss weights its tags but still
        divides by these, not by the weights (losses.causal_lm_loss), and so does distillation's. The loop
        weights each micro-batch of an optimiser step by its count, so every unit of the step counts alike."""
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()

    def loss(self, model, batch: dict, companions: dict, job) -> tuple[torch.Tensor, dict]:
        output = model(batch["input_ids"], labels=batch["labels"], loss_weights=batch.get("loss_weights"),
                       **self.model_inputs(model, batch, job))
        metrics = {"loss/aux": output.aux_loss.detach()} if unwrap(model).config.is_moe else {}
        return output.loss, metrics


def load_frozen(directory, device):
    model = load_model(directory, device=device)
    model.requires_grad_(False)
    return model.eval()


class DPOStage(Stage):
    normalised_over = "preference pairs"  # dpo_loss is a mean over the pairs, whatever their lengths

    def loss_count(self, batch: dict) -> torch.Tensor:
        ids = batch["chosen_input_ids"]
        return ids.new_full((), ids.shape[0])  # a fill on the device, not a copy from the host

    def companions(self, job, device) -> dict:
        return {"reference": load_frozen(job.init_dir, device)}  # the initial policy, frozen

    def loss(self, model, batch, companions, job):
        # Chosen and rejected rows go through the model as one batch of 2B rows.
        width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
        ids = torch.cat([_pad_to(batch["chosen_input_ids"], width, 0), _pad_to(batch["rejected_input_ids"], width, 0)])
        labels = torch.cat([_pad_to(batch["chosen_labels"], width, -100), _pad_to(batch["rejected_labels"], width, -100)])
        output = model(ids, return_logits=False)
        policy = sequence_logprobs(output.hidden_states, unwrap(model).lm_head.weight, labels)
        with torch.no_grad():
            reference_model = companions["reference"]
            reference = sequence_logprobs(
                reference_model(ids, return_logits=False).hidden_states, reference_model.lm_head.weight, labels
            )
        half = ids.shape[0] // 2
        loss, metrics = dpo_loss(
            policy[:half], policy[half:], reference[:half], reference[half:], beta=job.config.beta, rpo_alpha=job.config.rpo_alpha
        )
        return loss + output.aux_loss, metrics


class KDStage(Stage):
    needs_teacher = True

    def companions(self, job, device) -> dict:
        return {"teacher": load_frozen(job.teacher_dir, device)}

    def loss(self, model, batch, companions, job):
        output = model(batch["input_ids"])
        with torch.no_grad():
            teacher_logits = companions["teacher"](batch["input_ids"]).logits
        loss, metrics = kd_loss(
            output.logits, teacher_logits, batch["labels"], alpha=job.config.alpha, temperature=job.config.temperature
        )
        return loss + output.aux_loss, metrics


@dataclass(frozen=True)
class VLMStage(Stage):
    """MiniMind-V: the SFT loss, over text whose image placeholders carry projected image features.
    The VLM stages differ only in what trains (`--train-llm`): the projection alone, the projection and the
    LLM, or the projection and the LLM's first and last blocks (minimind-3v)."""

    def load(self, directory, device, config=None):
        vlm = load_vlm(directory, device=device).requires_grad_(False)
        vlm.projection.requires_grad_(True)
        vlm.train_language_model(getattr(config, "train_llm", "none"))
        return vlm.train()

    def save(self, model, directory, tokenizer) -> None:
        """A checkpoint references the frozen tower the model was loaded with instead of copying it
        (hundreds of MB for ViT-B/16); the registered model gets its copy once, at the end."""
        vlm = unwrap(model)
        save_vlm(vlm, directory, tokenizer=tokenizer, vision_model=vlm.vision_source)

    def model_inputs(self, model, batch, job):
        return {
            "pixel_values": batch.get("pixel_values")
        }  # decoded by the loader's collate (vision.BatchWithPixels); none: no image


def _pad_to(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)
