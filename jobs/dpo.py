"""Direct Preference Optimization against a frozen copy of the starting model.

    python jobs/dpo.py                                         # starts from models:/minimind-sft/latest
    python jobs/dpo.py --data dpo.jsonl --seq-len 1024 --batch-size 4 --lr 4e-8 --beta 0.1

Logs TRL's rewards/* and logps/* metrics. Registers `minimind-dpo`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minimind.driver.runner import main  # noqa: E402
from minimind.training.configs import DPOConfig  # noqa: E402


if __name__ == "__main__":
    main(DPOConfig, "dpo", description=__doc__)
