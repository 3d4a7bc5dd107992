"""`bbsmall serve`: an OpenAI-compatible chat server with dynamic batching, Prometheus metrics and a web chat page."""
