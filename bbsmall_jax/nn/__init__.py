"""The model: config, plain Flax layers, encoder/decoder/LM head, the KV cache pytree, outputs, input checks."""
