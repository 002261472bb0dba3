"""How hard should DPO pull? Sweep DPO's beta with Ray Tune from the registered SFT model and compare
the trials in MLflow: preference accuracy against how far the policy drifted and whether it still
answers the SFT questions.

    python tune/dpo_beta.py                                     # 4 betas log-uniform in [0.01, 1], 2.5 minutes on 2 CPU cores
    python tune/dpo_beta.py --grid 0.03 0.1 0.3 1.0 --steps 200 --init models:/minimind-sft/3
    python tune/dpo_beta.py --resume                            # continue an interrupted sweep

Each trial is the DPO job itself (a TorchTrainer reporting rewards/* to Tune) and records, on held-out
data: rewards/accuracies and margins (implicit reward = policy minus reference mean log-prob), the
drift (mean |policy - reference| per-token log-prob) and the SFT answer exact match.

The pick: among finished trials whose held-out answer exact match is at least the SFT model's minus
--answer-tolerance, the highest held-out rewards accuracy (ties: higher answer accuracy, then less
drift). It is registered as `minimind-dpo` with alias `best`; when no trial keeps the answers, none
is. Every trial runs its whole budget (no early stopping): the pick needs the final answers, which no
training-time metric predicts.
"""

from __future__ import annotations

import argparse

from minimind.driver.sweep import Sweep, finish, mark_keepers, run_sweep, trial_row, trial_runs
from minimind.training.configs import DPOConfig

COLUMNS = [
    "trial",
    "beta",
    "rewards_accuracy",
    "rewards_margin",
    "drift",
    "answer_exact_match",
    "answer_before",
    "status",
    "keeps_answers",
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    Sweep.add_flags(parser, "dpo-beta")
    parser.add_argument(
        "--grid", type=float, nargs="+", default=None, help="betas to try (default: --num-samples draws log-uniform in [0.01, 1])"
    )
    parser.add_argument("--init", default=None, help="SFT model to start from (default: models:/minimind-sft/latest)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per trial (default: %(default)s)")
    parser.add_argument(
        "--answer-tolerance",
        type=float,
        default=0.02,
        help="answer accuracy a trial may lose and still be picked (default: %(default)s)",
    )
    parser.add_argument("--data", default=None, help="DPO JSONL (default: the demo world's)")
    parser.add_argument("--eval-limit", type=int, default=100, help="held-out records per evaluation (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(num_samples=None)
    args = parser.parse_args(argv)

    from ray import tune

    if args.num_samples is None:
        args.num_samples = 1 if args.grid else 4
    sweep = Sweep.from_args(args)
    base = DPOConfig(
        init=args.init,
        max_steps=args.steps,
        checkpoint_every=max(1, args.steps // 4),
        log_every=max(1, args.steps // 6),
        data=args.data,
        eval_limit=args.eval_limit,
        seed=args.seed,
    )
    space = {"beta": tune.grid_search(args.grid) if args.grid else tune.loguniform(0.01, 1.0)}
    parent = run_sweep(sweep, "dpo", base, space, {"metric": "rewards/accuracies", "mode": "max"})

    rows = []
    for run in trial_runs(parent):
        metrics = run.data.metrics
        rows.append(
            trial_row(
                run,
                beta=float(run.data.params["beta"]),
                rewards_accuracy=metrics.get("eval/rewards_accuracy"),
                rewards_margin=metrics.get("eval/rewards_margin"),
                drift=metrics.get("eval/drift"),
                answer_exact_match=metrics.get("eval/answer_exact_match"),
                answer_before=metrics.get("eval_before/answer_exact_match"),
            )
        )
    mark_keepers(rows, args.answer_tolerance)
    rows.sort(
        key=lambda r: (not r["keeps_answers"], -(r["rewards_accuracy"] or 0), -(r["answer_exact_match"] or 0), r["drift"] or 0)
    )
    best = rows[0] if rows and rows[0]["keeps_answers"] else None
    return finish(parent, rows, COLUMNS, best, "minimind-dpo", plot), rows


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for r in rows if r["rewards_accuracy"] is not None), key=lambda r: r["beta"])
    figure, axis = plt.subplots(figsize=(6, 4))
    betas = [r["beta"] for r in rows]
    axis.plot(betas, [r["rewards_accuracy"] for r in rows], "o-", label="held-out rewards accuracy")
    axis.plot(betas, [r["answer_exact_match"] or 0 for r in rows], "s-", label="held-out SFT answer exact match")
    axis.plot(betas, [r["drift"] or 0 for r in rows], "^--", label="drift from the reference (mean |log-ratio|)")
    axis.set_xscale("log")
    axis.set_xlabel("beta")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


if __name__ == "__main__":
    main()
