"""Evaluation of a chat model on held-out dialogue (ParlAI's eval_model): perplexity, hits@1, distinct-n."""
