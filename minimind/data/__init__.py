"""The data pipeline: `rows` (JSONL records of every stage, checked line by line, to token rows,
batches and padding), `prepare` (a file tokenized once over the Ray cluster into shards), `shards`
(reading them back), `report` (what the data holds), `images` and `pixels` (a VLM's pictures).
Imports only `model` and `storage`."""
