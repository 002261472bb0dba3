"""The model: pure PyTorch, no Ray or MLflow. `config` (presets), `model` (the decoder: RMSNorm, RoPE,
GQA, SwiGLU or MoE, KV cache), `losses` (the language model's), `lora`, `vision` (MiniMind-V: CLIP tower
+ projection), `checkpoint` (a model folder: safetensors + config + tokenizer), `tokenizer` (the BPE
tokenizer every folder carries), `hf` (export to transformers as Llama or Qwen3; import from MiniMind checkpoints and folders).
Imports nothing of the package but `storage`."""
