"""Direct Preference Optimization against a frozen copy of the starting model.

    python jobs/dpo.py                                         # starts from models:/minimind-sft/latest
    python jobs/dpo.py --data dpo.jsonl --seq-len 1024 --batch-size 4 --lr 4e-8 --beta 0.1

Logs TRL's rewards/* and logps/* metrics. Registers `minimind-dpo`.
"""

from minimind.driver.runner import main

if __name__ == "__main__":
    main("dpo", description=__doc__)
