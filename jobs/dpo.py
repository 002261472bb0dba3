"""Direct Preference Optimization against a frozen copy of the starting model.

    python jobs/dpo.py                                         # starts from models:/minimind-sft/latest
    python jobs/dpo.py --data dpo.jsonl --seq-len 1024 --batch-size 4 --lr 4e-8 --beta 0.1

Logs TRL's rewards/* and logps/* metrics. Registers `minimind-dpo`.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minimind.runner import main  # noqa: E402
from minimind.train import TrainConfig  # noqa: E402


@dataclass
class DPOConfig(TrainConfig):
    beta: float = field(default=0.1, metadata={"help": "DPO temperature: how far the policy may move from the reference"})
    answer_eval: str | None = field(default=None, metadata={"help": "held-out SFT JSONL whose answer accuracy DPO should keep (default: the demo's, with the demo data)"})
    lr: float = 1e-4
    batch_size: int = 8


if __name__ == "__main__":
    main(DPOConfig, "dpo", description=__doc__)
