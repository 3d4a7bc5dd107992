"""Train-state checksums: every single-word change is seen, in every dtype the state holds."""

import jax.numpy as jnp
import numpy as np
import pytest

from bbsmall_jax.train.checksums import ChecksumError, check_finite_params, state_checksums, verify


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32", "uint32", "uint8", "bool"])
def test_a_change_to_any_one_element_changes_the_checksum(dtype):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, (7, 9)) if dtype == "bool" else rng.integers(0, 200, (7, 9))
    x = jnp.asarray(base).astype(dtype)
    saved = state_checksums({"x": x})
    for index in [(0, 0), (3, 4), (6, 8)]:
        changed = x.at[index].set(jnp.logical_not(x[index]) if dtype == "bool" else x[index] + 1)
        with pytest.raises(ChecksumError, match="array x does not match the checksum saved with it"):
            verify({"x": changed}, saved)
    swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])  # the same values in other places
    if x[0, 0] != x[0, 1]:
        with pytest.raises(ChecksumError):
            verify({"x": swapped}, saved)
    verify({"x": x}, saved)


def test_missing_checksums_and_non_finite_params_are_named():
    state = {"params": {"a": jnp.ones(3), "b": jnp.array([1.0, jnp.nan])}, "step": jnp.int32(1)}
    with pytest.raises(ChecksumError, match="array params/b has no saved checksum"):
        verify(state, {k: v for k, v in state_checksums(state).items() if k != "params/b"})
    with pytest.raises(ChecksumError, match="param b holds NaN or infinite values"):
        check_finite_params(state)
