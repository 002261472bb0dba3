"""Is a mixture of experts worth it? Sweep the MoE layout of a stage (default: pretraining from scratch
on the demo world) with Ray Tune and compare the trials in MLflow.

    python tune/moe_experts.py                                  # 4 trials, 3.3 minutes on 2 CPU cores (measured)
    python tune/moe_experts.py --experts 2 4 8 --top-k 1 2 --shared 0 1 --num-samples 4 --steps 300
    python tune/moe_experts.py --resume                         # continue an interrupted sweep

Every trial is the pretraining job itself (a TorchTrainer reporting to Tune), with the held-out loss
computed every few steps as `val/loss`; ASHA stops the trials that fall behind. Each trial's MLflow
child run records total and active parameters and tokens/s next to the held-out loss. The number of
routed experts is a grid; top-k and shared experts are sampled from their lists (--num-samples
repeats the grid with new samples); 1 expert with top-1 is the dense-equivalent baseline. The best
trial (lowest final held-out loss) is registered as `minimind-moe` with alias `best`.
"""

from __future__ import annotations

import argparse

from minimind.driver.sweep import Sweep, finish, run_sweep, trial_row, trial_runs
from minimind.training.configs import PretrainConfig

COLUMNS = ["trial", "num_experts", "top_k", "shared", "total_params", "active_params", "tokens_per_s", "heldout_loss", "status"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    Sweep.add_flags(parser, "moe-experts")
    parser.add_argument(
        "--experts", type=int, nargs="+", default=[1, 2, 4, 8], help="routed experts, a grid (default: %(default)s)"
    )
    parser.add_argument(
        "--top-k",
        type=int,
        nargs="+",
        default=[1, 2],
        help="experts per token, sampled; capped at the expert count (default: %(default)s)",
    )
    parser.add_argument("--shared", type=int, nargs="+", default=[0, 1], help="shared experts, sampled (default: %(default)s)")
    parser.add_argument("--preset", default="demo", help="model shape the layouts are applied to (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per trial (default: %(default)s)")
    parser.add_argument(
        "--reports", type=int, default=6, help="held-out evaluations per trial, ASHA's rungs (default: %(default)s)"
    )
    parser.add_argument("--data", default=None, help="pretraining JSONL (default: the demo world's)")
    parser.add_argument("--eval-data", default=None, help="held-out JSONL (default: the demo world's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from ray import tune

    sweep = Sweep.from_args(args)
    every = max(1, args.steps // args.reports)
    base = PretrainConfig(
        preset=args.preset,
        max_steps=args.steps,
        val_every=every,
        checkpoint_every=every,
        log_every=every,
        data=args.data,
        eval_data=args.eval_data,
        seed=args.seed,
        warmup_steps=min(20, args.steps // 5),
        eval_limit=64,
    )
    space = {  # ModelConfig field names: the trial applies them as --config-overrides
        "num_experts": tune.grid_search(args.experts),
        "num_experts_per_tok": tune.choice(args.top_k),
        "num_shared_experts": tune.choice(args.shared),
    }
    parent = run_sweep(sweep, "pretrain", base, space, scheduling(args.reports)[1])

    rows = []
    for run in trial_runs(parent):
        params, metrics = run.data.params, run.data.metrics
        rows.append(
            trial_row(
                run,
                stopped="stopped early",
                num_experts=int(params.get("num_experts", 0)),
                top_k=int(params.get("num_experts_per_tok", 0)),
                shared=int(params.get("num_shared_experts", 0)),  # each swept value is a param of the trial's run
                total_params=int(metrics.get("model/parameters", 0)),
                active_params=int(metrics.get("model/active_parameters", 0)),
                tokens_per_s=metrics.get("train/tokens_per_s"),
                heldout_loss=metrics.get("eval/heldout_loss", metrics.get("val/loss")),
            )
        )
    rows.sort(
        key=lambda row: (row["status"] != "finished", row["heldout_loss"] if row["heldout_loss"] is not None else float("inf"))
    )
    best = rows[0] if rows and rows[0]["status"] == "finished" else None
    return finish(parent, rows, COLUMNS, best, "minimind-moe", plot), rows


def scheduling(reports: int):
    """ASHA on the held-out loss: a trial behind the others at a rung (2, 4, ... reports) stops there."""
    from ray.tune.schedulers import ASHAScheduler

    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=reports + 1, grace_period=2, reduction_factor=2)
    return scheduler, {"metric": "val/loss", "mode": "min", "scheduler": scheduler}


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for row in rows:
        label = f"{row['num_experts']}e top{row['top_k']} s{row['shared']}"
        if row["heldout_loss"] is not None:
            left.scatter(row["active_params"] / 1e6, row["heldout_loss"], marker="o" if row["status"] == "finished" else "x")
            left.annotate(label, (row["active_params"] / 1e6, row["heldout_loss"]), fontsize=8)
    left.set_xlabel("active parameters (M)")
    left.set_ylabel("held-out loss (x: stopped early)")
    right.barh([f"{r['num_experts']}e top{r['top_k']} s{r['shared']}" for r in rows], [r["tokens_per_s"] or 0 for r in rows])
    right.set_xlabel("training tokens/s")
    figure.tight_layout()
    return figure


if __name__ == "__main__":
    main()
