"""The functions a plan hands the layers (`nn/layer_functions.py`): the layers call them, and nothing else."""

import jax
import jax.numpy as jnp
import numpy as np

from bbsmall_jax import BlenderbotSmallConfig
from bbsmall_jax.nn.layer_functions import KERNEL_LAYOUTS, PLAIN, LayerFunctions, plain_dense
from bbsmall_jax.nn.model import build_module, init_params
from bbsmall_jax.testing.shapes import TINY


def test_every_linear_layer_calls_the_dense_function_with_its_laid_out_kernel():
    """A dense function given kernels laid out otherwise (here transposed) gets each decoder layer's own, under
    the params' paths, and the model's output is unchanged; the encoder's layers, without entries, get None."""
    config = BlenderbotSmallConfig(**TINY)
    module = build_module(config, "seq2seq_lm")
    params = init_params(module, jax.random.PRNGKey(0))
    calls = {"laid out": 0, "plain": 0}

    def transposed_dense(x, kernel, bias, dtype, laid_out=None):
        if laid_out is None:
            calls["plain"] += 1
            return plain_dense(x, kernel, bias, dtype)
        calls["laid out"] += 1
        return plain_dense(x, laid_out.T, bias, dtype)  # the entry is the kernel transposed: [O, I]

    layouts = jax.tree_util.tree_map_with_path(  # every decoder kernel transposed, under its path
        lambda path, leaf: leaf.T if path[-1].key == "kernel" else None, {"decoder": params["decoder"]})
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 100, (2, 5)), jnp.int32)
    plain = module.apply({"params": params}, ids, decoder_input_ids=ids).logits
    given = module.clone(functions=LayerFunctions(dense=transposed_dense))
    out = given.apply({"params": params, KERNEL_LAYOUTS: layouts}, ids, decoder_input_ids=ids).logits
    np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
    per_layer = 4 + 4 + 2  # self-attention, cross-attention, feed-forward
    assert calls == {"laid out": config.decoder_layers * per_layer, "plain": config.encoder_layers * (4 + 2)}


def test_the_plain_functions_compute_what_flax_dense_computes():
    from flax import linen as nn

    x = jax.random.normal(jax.random.PRNGKey(1), (3, 2, 7))
    params = nn.Dense(5).init(jax.random.PRNGKey(0), x)["params"]
    params = dict(params, bias=jnp.arange(5.0))
    for dtype in (jnp.float32, jnp.bfloat16):
        expected = nn.Dense(5, dtype=dtype).apply({"params": params}, x)
        got = PLAIN.dense(x, params["kernel"], params["bias"], dtype)
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))
