"""The CPU kernel (`cpu_kernels`): the small-rows matmul against numpy, the packed Dense path against the
plain one, generation with and without it against transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import linen as nn

from bbsmall_jax.generation import cpu_kernel as cpu_kernels
from bbsmall_jax.generation import cpu_path
from bbsmall_jax.generation import plan as plan_lib
from bbsmall_jax.nn.layer_functions import KERNEL_LAYOUTS, LayerFunctions
from bbsmall_jax.nn.layers import Linear
from bbsmall_jax.testing.reference_models import assert_same

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason="CPU kernel not built or no AVX-512 here")


def _cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as info:
            return any(line.startswith("flags") and " avx512f" in line for line in info)
    except OSError:
        return False


@pytest.mark.skipif(not _cpu_has_avx512() or jax.default_backend() != "cpu", reason="no AVX-512 CPU")
def test_the_kernel_is_built_and_registered_on_an_avx512_cpu():
    """An install that silently failed to build the extension would otherwise only be slower."""
    assert cpu_kernels.available()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 10, 12, 13, 25])
@pytest.mark.parametrize("depth,columns", [(64, 8199), (512, 512), (24, 7)])
def test_small_rows_matmul_matches_numpy(rows, depth, columns):
    rng = np.random.default_rng(rows * 1000 + columns)
    x = rng.standard_normal((rows, depth)).astype(np.float32)
    w = rng.standard_normal((depth, columns)).astype(np.float32)
    bias = rng.standard_normal(columns).astype(np.float32)
    expected = x.astype(np.float64) @ w.astype(np.float64) + bias
    packed = cpu_kernels.pack_columns(jnp.asarray(w))
    got = np.asarray(jax.jit(cpu_kernels.small_rows_matmul)(jnp.asarray(x), packed, jnp.asarray(bias)))
    assert got.shape == (rows, columns)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.sqrt(depth))
    # the embedding layout: its transpose packed
    transposed = cpu_kernels.pack_transposed(jnp.asarray(w.T.copy()))
    np.testing.assert_array_equal(np.asarray(transposed.panels), np.asarray(packed.panels))


@needs_kernel
def test_small_rows_matmul_keeps_leading_axes_and_checks_features():
    x = jnp.ones((2, 3, 16), jnp.float32)
    packed = cpu_kernels.pack_columns(jnp.ones((16, 40)))
    out = cpu_kernels.small_rows_matmul(x, packed)
    np.testing.assert_allclose(np.asarray(out), np.full((2, 3, 40), 16.0))
    with pytest.raises(ValueError, match="features"):
        cpu_kernels.small_rows_matmul(jnp.ones((2, 8)), packed)


@needs_kernel
def test_small_rows_matmul_with_no_rows_or_no_features():
    bias = jnp.arange(40.0)
    no_features = cpu_kernels.PackedColumns(panels=jnp.zeros((2, 0, cpu_kernels.PANEL)), columns=40)
    np.testing.assert_array_equal(np.asarray(cpu_kernels.small_rows_matmul(jnp.zeros((3, 0)), no_features, bias)),
                                  np.tile(np.arange(40.0), (3, 1)))
    packed = cpu_kernels.pack_columns(jnp.ones((8, 40)))
    assert cpu_kernels.small_rows_matmul(jnp.zeros((0, 8)), packed).shape == (0, 40)


def test_pack_dense_kernels_mirrors_the_params_tree():
    params = {"decoder": {"layers_0": {"fc1": {"kernel": jnp.ones((4, 6)), "bias": jnp.zeros(6)},
                                       "self_attn_layer_norm": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}},
                          "embed_positions": {"embedding": jnp.ones((8, 4))}}}
    packed = cpu_kernels.pack_dense_kernels(params)
    assert list(packed) == ["decoder"] and list(packed["decoder"]) == ["layers_0"]
    assert list(packed["decoder"]["layers_0"]) == ["fc1"]
    kernel = packed["decoder"]["layers_0"]["fc1"]["kernel"]
    assert kernel.columns == 6 and kernel.panels.shape == (1, 4, cpu_kernels.PANEL)


@needs_kernel
def test_dense_with_its_packed_kernel_equals_plain_dense():
    layer = Linear(70, 0.5, functions=LayerFunctions(dense=cpu_path.dense))
    x = jax.random.normal(jax.random.PRNGKey(1), (10, 1, 33))
    params = layer.init(jax.random.PRNGKey(0), x)["params"]
    params = {"kernel": params["kernel"], "bias": jax.random.normal(jax.random.PRNGKey(2), (70,))}
    plain = nn.Dense(70).apply({"params": params}, x)
    unpacked = layer.apply({"params": params}, x)  # no packed kernel given: the plain matmul
    packed = layer.apply({"params": params, KERNEL_LAYOUTS: cpu_kernels.pack_dense_kernels(params)}, x)
    np.testing.assert_array_equal(np.asarray(unpacked), np.asarray(plain))
    np.testing.assert_allclose(np.asarray(packed), np.asarray(plain), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_generation_without_the_kernel_gives_the_same_tokens(models, prompts, monkeypatch):
    """The CPU path with XLA's matmul (CPUs without AVX-512) against transformers, and the kernel's copies
    are not reused for it."""
    hf, ours = models
    monkeypatch.setattr(ours, "decode_path", "cpu")
    for kwargs in (dict(num_beams=4, max_length=20, no_repeat_ngram_size=3, min_length=8),
                   dict(max_length=16, min_length=10)):
        assert ours.decoding_plan(4).cpu_kernel
        with_kernel = assert_same(hf, ours, *prompts, **kwargs)
        with monkeypatch.context() as patched:
            patched.setattr(plan_lib, "_kernel_usable", lambda: False)
            assert not ours.decoding_plan(4).cpu_kernel
            without = assert_same(hf, ours, *prompts, **kwargs)
        np.testing.assert_array_equal(with_kernel, without)
        assert ours.sampler.decoding_weights(ours.params, ours.decoding_plan(4))[1] is not None
