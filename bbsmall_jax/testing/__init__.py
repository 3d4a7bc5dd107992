"""Test utilities: random-weight transformers reference models, training fixtures, compilation counts.

The reference models need the `test` extra (torch, transformers); nothing in the package imports them.
"""


def compilations(model) -> int:
    """How many generation programs `model` has compiled (one per plan, static settings and shapes)."""
    return sum(program._cache_size() for program in model.__dict__.get("_programs", {}).values())
