"""What every Ray Train worker runs: `loop` (the one training loop: precision, accumulation, schedule,
DDP, checkpoints, metrics), `stages` (what differs between stages: data kind, loss, frozen companions),
`losses` (DPO, KD), `heldout` (the held-out loss), `configs` and `flags` (each stage's settings and their
command-line flags), `flops`, `clip` (the CLIP tower's contrastive pretraining). Imports only `model`,
`data` and `storage`."""
