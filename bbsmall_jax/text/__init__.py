"""Text: the tokenizer (Rust BPE + exact pre-tokenization), its plain-Python reference, vocabulary training."""
