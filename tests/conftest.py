"""Test setup: make tests/ importable (shared helpers such as hf_models) and keep JAX on the CPU."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))
