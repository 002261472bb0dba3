"""How many completions per prompt, and how tight a leash? Sweep GRPO's group size and KL coefficient
with Ray Tune from the registered reasoning model and compare the trials in MLflow.

    python tune/grpo.py                                         # groups 4 and 8 x KL 0 and 0.05
    python tune/grpo.py --group-sizes 4 8 16 --kl-coefs 0 0.02 0.1 --steps 100 --init models:/minimind-reason/3
    python tune/grpo.py --resume                                # continue an interrupted sweep

Each trial is the GRPO job itself (a TorchTrainer with its rollout actor, reporting its reward to Tune)
and records, on held-out data: the reasoning answer accuracy and format, and the SFT answers it should
keep. The pick: among finished trials whose held-out SFT answer exact match is at least the starting
model's minus --answer-tolerance, the highest held-out reasoning accuracy (ties: more SFT answers kept,
then the smaller group, which costs less). It is registered as `minimind-grpo` with alias `best`.
"""

from __future__ import annotations

import argparse

from minimind.driver.sweep import Sweep, finish, mark_keepers, run_sweep, trial_row, trial_runs
from minimind.training.configs import GRPOConfig

COLUMNS = [
    "trial",
    "group_size",
    "kl_coef",
    "reasoning_accuracy",
    "accuracy_before",
    "answer_exact_match",
    "answer_before",
    "status",
    "keeps_answers",
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    Sweep.add_flags(parser, "grpo")
    parser.add_argument(
        "--group-sizes", type=int, nargs="+", default=[4, 8], help="completions per prompt to try (default: %(default)s)"
    )
    parser.add_argument(
        "--kl-coefs", type=float, nargs="+", default=[0.0, 0.05], help="KL coefficients to try (default: %(default)s)"
    )
    parser.add_argument("--init", default=None, help="model to start from (default: models:/minimind-reason/latest)")
    parser.add_argument("--steps", type=int, default=60, help="GRPO steps per trial (default: %(default)s)")
    parser.add_argument(
        "--answer-tolerance",
        type=float,
        default=0.02,
        help="SFT answer accuracy a trial may lose and still be picked (default: %(default)s)",
    )
    parser.add_argument("--data", default=None, help="prompts JSONL (default: the demo world's reasoning file)")
    parser.add_argument("--eval-limit", type=int, default=100, help="held-out records per evaluation (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from ray import tune

    sweep = Sweep.from_args(args)
    base = GRPOConfig(
        init=args.init,
        max_steps=args.steps,
        checkpoint_every=max(1, args.steps // 4),
        log_every=max(1, args.steps // 6),
        data=args.data,
        eval_limit=args.eval_limit,
        seed=args.seed,
    )
    space = {"group_size": tune.grid_search(args.group_sizes), "kl_coef": tune.grid_search(args.kl_coefs)}
    parent = run_sweep(sweep, "grpo", base, space, {"metric": "reward/total/mean", "mode": "max"})

    rows = []
    for run in trial_runs(parent):
        metrics = run.data.metrics
        rows.append(
            trial_row(
                run,
                group_size=int(run.data.params["group_size"]),
                kl_coef=float(run.data.params["kl_coef"]),
                reasoning_accuracy=metrics.get("eval/reasoning_accuracy"),
                accuracy_before=metrics.get("eval_before/reasoning_accuracy"),
                answer_exact_match=metrics.get("eval/answer_exact_match"),
                answer_before=metrics.get("eval_before/answer_exact_match"),
            )
        )
    mark_keepers(rows, args.answer_tolerance)
    rows.sort(
        key=lambda r: (not r["keeps_answers"], -(r["reasoning_accuracy"] or 0), -(r["answer_exact_match"] or 0), r["group_size"])
    )
    best = rows[0] if rows and rows[0]["keeps_answers"] else None
    return finish(parent, rows, COLUMNS, best, "minimind-grpo", plot), rows


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for kl_coef in sorted({r["kl_coef"] for r in rows}):
        trials = sorted(
            (r for r in rows if r["kl_coef"] == kl_coef and r["reasoning_accuracy"] is not None), key=lambda r: r["group_size"]
        )
        axis.plot(
            [r["group_size"] for r in trials],
            [r["reasoning_accuracy"] for r in trials],
            "o-",
            label=f"reasoning accuracy, KL {kl_coef:g}",
        )
    before = next((r["accuracy_before"] for r in rows if r["accuracy_before"] is not None), None)
    if before is not None:
        axis.axhline(before, linestyle="--", color="grey", label="before GRPO")
    axis.set_xlabel("group size (completions per prompt)")
    axis.set_xscale("log", base=2)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


if __name__ == "__main__":
    main()
