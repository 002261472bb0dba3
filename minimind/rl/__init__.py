"""Reinforcement learning from rewards: `grpo` (GRPO/CISPO's loop on top of the training one), `rollout`
(the Ray actor that samples completions), `rewards`, `losses` (advantages and the policy loss)."""
