"""Distillation, from models:/minimind-dpo/latest by default.

    python jobs/distill.py                      # --mode reason: SFT on teacher-written <think>/<answer> traces
    python jobs/distill.py --mode kd --teacher models:/minimind-sft/latest --alpha 0.5 --temperature 1.5

reason weights the tag tokens by --tag-weight (10, as MiniMind). kd mixes cross-entropy with the KL
divergence to a teacher's temperature-softened distribution (same vocabulary). Registers `minimind-reason`.
"""

from minimind.driver.runner import run_stage
from minimind.training.configs import DistillConfig
from minimind.training.flags import parse_config


def main(argv=None):
    config = parse_config(DistillConfig, argv, __doc__)
    if config.mode not in ("reason", "kd"):
        raise SystemExit(f"--mode must be reason or kd, not {config.mode!r}")
    return run_stage(config, config.mode)


if __name__ == "__main__":
    main()
