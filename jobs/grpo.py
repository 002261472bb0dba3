"""GRPO: reasoning trained by reward instead of imitation, from models:/minimind-reason/latest by default.

    python jobs/grpo.py                                            # the demo's additions: answer + format rewards
    python jobs/grpo.py --rewards answer=1,format=0.5,length=0.1 --group-size 8 --kl-coef 0.02
    python jobs/grpo.py --loss-type cispo --updates-per-rollout 2   # CISPO: capped, detached importance weights, token-averaged
    python jobs/grpo.py --data rl.jsonl --rewards model=1 --reward-model models:/my-judge/1
    python jobs/grpo.py --tools demo                               # tool use: the demo's tools run between turns

Each step a Ray actor samples --group-size completions per prompt with the policy's latest weights
(handed over through Ray's object store), the rewards score them, and the policy takes a clipped
policy-gradient step on their group-relative advantages, held near the starting model by --kl-coef.
Log-probabilities are scored at the sampling --temperature (on the untruncated distribution, whatever
--top-p), and the policy trains with dropout off: the ratios are those of the policy that sampled.
Registers `minimind-grpo` (`minimind-grpo-tools` with --tools).
"""

from minimind.driver.runner import main

if __name__ == "__main__":
    main("grpo", description=__doc__)
