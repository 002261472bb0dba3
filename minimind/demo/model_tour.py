"""A tour of the model on synthetic token data, no downloads: every preset's size, then a tiny model
that learns to continue arithmetic sequences, is saved, reloaded, decoded with and without its KV
cache, and exported to Hugging Face Llama format with matching logits."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from minimind.inference.generate import generate
from minimind.model.checkpoint import load_model, save_model
from minimind.model.config import PRESETS, ModelConfig
from minimind.model.hf import export_hf
from minimind.model.model import MiniMindForCausalLM

FIRST_ID, ALPHABET = 3, 64  # sequence tokens are ids 3..66; 0-2 stay pad / <s> / </s>


def arithmetic_sequences(count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Rows like 7 10 13 16 ... (mod ALPHABET): the continuation is learnable from any prefix of two."""
    start = torch.randint(0, ALPHABET, (count, 1), generator=generator)
    stride = torch.randint(1, 4, (count, 1), generator=generator)
    return FIRST_ID + (start + stride * torch.arange(length)) % ALPHABET


def run(preset: str = "tiny", steps: int = 150, output: Path = Path("checkpoints/demo-model"), seq_len: int = 32) -> dict:
    print("presets:")
    for name, config in PRESETS.items():
        with torch.device("meta"):
            model = MiniMindForCausalLM(config)
        print(
            f"  {name:16s} {model.num_parameters() / 1e6:8.2f}M parameters "
            f"({model.num_parameters(active=True) / 1e6:.2f}M active)"
        )

    torch.manual_seed(0)
    data = torch.Generator().manual_seed(0)
    model = MiniMindForCausalLM(ModelConfig.from_name(preset))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    print(f"\ntraining {preset} for {steps} steps on arithmetic sequences (bf16 autocast on CPU)")
    started = time.perf_counter()
    for step in range(1, steps + 1):
        batch = arithmetic_sequences(32, seq_len, data)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1 or step % 25 == 0 or step == steps:
            print(f"  step {step:4d}  loss {loss.item():.3f}  elapsed {time.perf_counter() - started:.1f}s")

    held_out = arithmetic_sequences(16, 12, torch.Generator().manual_seed(1234))
    prompts, expected = held_out[:, :4].tolist(), held_out[:, 4:].tolist()
    continuations = generate(model, prompts, max_new_tokens=8, stop_token_ids=[])
    accuracy = sum(c == e for c, e in zip(continuations, expected)) / len(expected)
    print(f"\nheld-out: {prompts[0]} -> {continuations[0]} (expected {expected[0]})")
    print(f"held-out exact continuations: {accuracy:.0%} of {len(expected)}")

    save_model(model, output)
    reloaded = load_model(output)
    identical = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
    print(f"\nsaved {output} and reloaded it: weights bit-identical = {identical}")

    started = time.perf_counter()
    cached = generate(reloaded, prompts, max_new_tokens=8, stop_token_ids=[])
    cached_seconds = time.perf_counter() - started
    started = time.perf_counter()
    recomputed = generate(reloaded, prompts, max_new_tokens=8, stop_token_ids=[], use_cache=False)
    print(
        f"KV-cached decoding equals full recomputation: {cached == recomputed} "
        f"({cached_seconds * 1000:.0f} ms vs {(time.perf_counter() - started) * 1000:.0f} ms)"
    )

    from transformers import AutoModelForCausalLM

    hf_dir = export_hf(output, output.with_name(output.name + "-hf"))
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir)
    with torch.no_grad():
        difference = (hf_model(held_out).logits - reloaded(held_out).logits).abs().max().item()
    print(f"exported {hf_dir} (LlamaForCausalLM): max |logit difference| = {difference:.2e}")
    return {
        "final_loss": loss.item(),
        "held_out_accuracy": accuracy,
        "bit_identical": identical,
        "cache_matches": cached == recomputed,
        "hf_max_difference": difference,
    }
