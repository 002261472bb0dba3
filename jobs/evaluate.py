"""lm-evaluation-harness tasks on a model, spread over the Ray cluster: one Ray task per named task (a group or tag
stays whole), the model and the task folders staged on the run's storage for the workers.

    python jobs/evaluate.py --model models:/minimind-reason/latest --tasks minimind_demo_facts,minimind_demo_addition
    ray job submit -- python jobs/evaluate.py --model models:/minimind-sft/3 --tasks ceval-valid,cmmlu \\
        --storage-path s3://bucket/minimind --promote champion --gate "ceval-valid/acc>=0.3"

The scores go to the model's MLflow run as `minimind eval` logs them (`harness/<task>/<metric>`).
"""

import argparse

from minimind.driver.eval_flags import add_eval_flags, evaluate_and_record
from minimind.driver.harness import run_harness_on_cluster


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_flags(parser, model_flag=True)
    parser.add_argument("--storage-path", default=None, help="where the workers' inputs are staged (default: ray_results)")
    parser.add_argument("--cpus-per-task", type=int, default=1, help="CPUs per task (and a GPU, where the cluster has GPUs)")
    args = parser.parse_args(argv)
    return evaluate_and_record(args, lambda model, tasks, settings: run_harness_on_cluster(
        model, tasks, args.include_path, args.storage_path, args.cpus_per_task, **settings))


if __name__ == "__main__":
    main()
