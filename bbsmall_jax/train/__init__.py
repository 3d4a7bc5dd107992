"""Training: data pipeline, config, mesh and sharding, optimizer and steps, checkpoints and metrics, the loop."""
