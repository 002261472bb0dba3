"""Ray Serve: the final models behind an OpenAI-compatible API (see app.py), batching in engine.py."""
