"""The embedded demo: deterministic synthetic data that a tiny model visibly learns on a CPU."""
