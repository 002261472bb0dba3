"""Inference: `sampling` (one token per row, each with its own settings), `generate` (batched, KV-cached
decoding), `continuous` (rows that join and leave a decoding batch, for servers), `chat` (the one loader
of a chat model folder, used by the CLI, Serve, the MLflow pyfunc model and evaluation).
Imports only `model`, `data` and `storage`."""
