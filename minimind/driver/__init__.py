"""The driver side of a job: `stages` (the table of stages and every fact about each), `runner` (one
stage job: inputs, data preparation, evaluation before and after, the TorchTrainer, registration),
`cluster` (placement and inputs for nodes that share no disk), `evaluate` (held-out metrics), `sweep`
(Ray Tune sweeps of a stage), `clip_runner` (the CLIP tower's job), `showcase` (the demo's last words)."""
