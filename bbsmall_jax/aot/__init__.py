"""Ahead-of-time compilation for accelerator topologies this machine does not have: programs, reports."""
