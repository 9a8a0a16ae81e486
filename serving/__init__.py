"""`lora-jax serve`: many LoRA adapters over one (quantized) base behind an
OpenAI-compatible HTTP server, with continuous batching and an adapter bank."""
