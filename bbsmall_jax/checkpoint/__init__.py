"""Checkpoints: the HF <-> Flax name table, weight files, hub resolution (never builds the Flax model)."""
