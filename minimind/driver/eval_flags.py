"""What `minimind eval` and `jobs/evaluate.py` share: their flags, and the run that follows the scores (print the
harness's table, write it, log it on the model's MLflow run, apply the registry gate). Light to import: the
harness and MLflow load only when a command runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable


def add_eval_flags(parser: argparse.ArgumentParser, model_flag: bool = False) -> None:
    model_help = "model folder, or models:/NAME/VERSION|latest|@alias (adapters merged)"
    if model_flag:
        parser.add_argument("--model", required=True, help=model_help)
    else:
        parser.add_argument("model", help=model_help)
    parser.add_argument("--tasks", required=True, help="harness task or tag names, comma-separated "
                        "(minimind_demo: the demo world's facts and additions, offline)")
    parser.add_argument("--include-path", action="append", default=[], help="a folder of task YAML in the harness's format")
    parser.add_argument("--limit", type=float, default=None, help="examples per task (a fraction when < 1)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-chat-template", action="store_true",
                        help="score the raw prompt (default: the question as a chat turn, as the chat models were trained)")
    parser.add_argument("--no-log", action="store_true", help="print the table only; log nothing to MLflow")
    parser.add_argument("--output", default=None, help="also write the harness's results as JSON here")
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0, help="the harness's seeds, and the demo world's tasks")
    parser.add_argument("--promote", default=None, metavar="ALIAS",
                        help="move this alias (e.g. champion) here when the version passes --gate and beats its holder")
    parser.add_argument("--gate", default=None, help='thresholds for --promote, e.g. "minimind_demo_facts/acc>=0.9,'
                        'minimind_demo_addition>=0.5" (task/metric as logged, or task alone when it has one metric)')


def evaluate_and_record(args: argparse.Namespace, evaluate: Callable[[str, list[str], dict], dict]) -> dict:
    """`evaluate(model, tasks, settings)` on args.model, then the table, the JSON, the MLflow run and the gate."""
    from lm_eval.utils import make_table

    from minimind.driver.gate import parse_gate
    from minimind.driver.harness import log_results, promote, scores

    if bool(args.promote) != bool(args.gate) or (args.promote and args.no_log):
        raise SystemExit("--promote and --gate go together, and the comparison is logged (no --no-log)")
    gate = parse_gate(args.gate) if args.gate else None
    tasks = [task for task in args.tasks.split(",") if task]
    settings = {"limit": args.limit, "batch_size": args.batch_size, "chat_template": not args.no_chat_template,
                "device": args.device, "seed": args.seed}
    results = evaluate(args.model, tasks, settings)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.output:
        Path(args.output).write_text(json.dumps(results, ensure_ascii=False, indent=2, default=str), encoding="utf-8")
    if not args.no_log:
        run_id = log_results(args.model, results, {"harness.tasks": ",".join(tasks), "harness.limit": str(args.limit)})
        print(f"logged to MLflow run {run_id}")
    if gate:
        verdict = promote(args.model, args.promote, gate, scores(results), args.limit,
                          lambda holder: evaluate(holder, tasks, settings))
        print(f"@{args.promote}: {'promoted' if verdict.promoted else 'refused'} ({verdict.reason})")
    return results
