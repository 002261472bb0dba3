"""Learning curves of a demo text stage: the stage's own loop (its model, data, loss, batch order,
AdamW, warmup + cosine schedule and bf16 autocast, from minimind.training.loop) outside Ray, printing the
stage's held-out metrics every --eval-every steps. It shows where a skill appears in a run and how far
that moves with the seed, the thread count or the optimiser's kernel: what makes a demo result fragile.

    python bench/stage_curve.py --stage reason --init models:/minimind-dpo/latest             # the pipeline's settings
    python bench/stage_curve.py --stage reason --init models:/minimind-dpo/latest --threads 1 # another machine's rounding
    python bench/stage_curve.py --stage reason --init models:/minimind-dpo/latest --fused     # fused AdamW on CPU
    python bench/stage_curve.py --stage sft --init models:/minimind-pretrain/latest --epochs 3

The pipeline's settings per stage come from jobs/pipeline.py's STAGES; --epochs/--lr override them.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))

import torch  # noqa: E402


def held_out_metrics(stage_name: str, model, tokenizer, paths: dict, limit: int, show: int = 0) -> dict:
    from minimind.driver.evaluate import answer_exact_match, reasoning_scores, text_replier

    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        metrics = {}
        if stage_name == "reason":
            scores = reasoning_scores(
                text_replier(model, tokenizer, max_new_tokens=160, batch_size=64), paths["reason_eval"], tokenizer, limit
            )
            metrics |= {"format": scores["format"], **{f"acc/{task}": value for task, value in scores["by_task"].items()}}
            for prompt, reply in scores["samples"][:show]:
                print(f"    {prompt!r} -> {reply!r}")
        answers = answer_exact_match(text_replier(model, tokenizer, max_new_tokens=64, batch_size=64), paths["sft_eval"], limit)
        metrics |= {"sft": answers["accuracy"], **{f"sft/{task}": value for task, value in answers["by_task"].items()}}
    model.train()
    return metrics


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="reason", choices=("sft", "reason"))
    parser.add_argument("--init", required=True, help="the starting model: folder or models:/ URI")
    parser.add_argument("--seed", type=int, default=0, help="the demo world and the batch order")
    parser.add_argument("--epochs", type=int, default=0, help="0: the pipeline's")
    parser.add_argument("--lr", type=float, default=0.0, help="0: the pipeline's")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-limit", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--show", type=int, default=0, help="print this many held-out replies at each evaluation")
    parser.add_argument("--fused", action="store_true", help="fused AdamW (the stage jobs use foreach on CPU)")
    args = parser.parse_args(argv)

    from pipeline import STAGES

    from minimind import tracking
    from minimind.data.rows import LengthGroupedBatches, StageData, collate, load_stage_dataset, row_lengths
    from minimind.demo import demo_data
    from minimind.driver.stages import STAGES as STAGE_KINDS
    from minimind.model.checkpoint import load_model
    from minimind.model.tokenizer import load_tokenizer
    from minimind.training.loop import accumulate_gradients, cosine_lr

    if args.threads:
        torch.set_num_threads(args.threads)
    config = next(config for name, config, _ in STAGES if name == args.stage)
    config = replace(config, seed=args.seed, epochs=args.epochs or config.epochs, lr=args.lr or config.lr)
    tracking.configure()
    torch.manual_seed(args.seed)
    paths = demo_data(args.seed)
    init = tracking.resolve_model(args.init)
    model, tokenizer = load_model(init), load_tokenizer(init)
    stage = STAGE_KINDS[args.stage]
    rows = load_stage_dataset(
        paths[stage.demo_file],
        tokenizer,
        StageData(stage.data_kind, seq_len=config.seq_len, tag_weight=getattr(config, "tag_weight", StageData.tag_weight)),
    )
    batches = LengthGroupedBatches(row_lengths(rows), config.batch_size, seed=config.seed)
    total = config.epochs * len(batches)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay, fused=args.fused)
    print(
        f"{args.stage} from {args.init}, seed {args.seed}: {config.epochs} epochs x {len(batches)} steps at lr {config.lr}, "
        f"{torch.get_num_threads()} threads, {'fused' if args.fused else 'foreach'} AdamW",
        flush=True,
    )
    print(f"step     0 | {held_out_metrics(args.stage, model, tokenizer, paths, args.eval_limit)}", flush=True)
    model.train()
    step, started = 0, time.perf_counter()
    for epoch in range(config.epochs):
        batches.set_epoch(epoch)
        for indices in batches:
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total, config.lr, config.warmup_steps, config.min_lr_ratio)
            batch = collate([rows[i] for i in indices], tokenizer.pad_token_id)
            sums = accumulate_gradients(model, stage, [batch], {}, None, torch.device("cpu"), amp_dtype=torch.bfloat16)
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % args.eval_every == 0 or step == total:
                metrics = held_out_metrics(args.stage, model, tokenizer, paths, args.eval_limit, args.show)
                shown = " ".join(f"{key} {value:.2f}" for key, value in metrics.items())
                print(
                    f"step {step:5d} | {time.perf_counter() - started:4.0f}s | loss {sums['train/loss'].item():.3f} | {shown}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
