"""The decoding plan: defaults per backend, the environment override, and what the portable program contains."""

import jax.numpy as jnp
import numpy as np
import pytest

from bbsmall_jax import BlenderbotSmallConfig, BlenderbotSmallForConditionalGeneration
from bbsmall_jax.generation.plan import PATH_VARIABLE, PORTABLE, choose_plan
from bbsmall_jax.testing.shapes import TINY

SETTINGS = [dict(max_length=10), dict(num_beams=3, max_length=10, no_repeat_ngram_size=2),
            dict(do_sample=True, top_p=0.9, top_k=5, max_length=10)]


@pytest.fixture(scope="module")
def model():
    return BlenderbotSmallForConditionalGeneration(BlenderbotSmallConfig(**TINY), seed=1)


def test_default_path_is_cpu_on_the_cpu_backend_and_portable_elsewhere(monkeypatch):
    monkeypatch.delenv(PATH_VARIABLE, raising=False)
    for backend in ("gpu", "tpu"):
        assert choose_plan(backend, jnp.bfloat16, 64) == PORTABLE
    cpu = choose_plan("cpu", jnp.float32, 1)
    assert (cpu.path, cpu.attention, cpu.top_k, cpu.argmax, cpu.lm_head) == ("cpu", "windowed", "blockwise",
                                                                            "max_min", "tied")
    several = choose_plan("cpu", jnp.bfloat16, 10)
    assert several.lm_head == "transposed" and not several.cpu_kernel  # the kernel is float32 only


def test_the_environment_forces_a_path(monkeypatch):
    monkeypatch.setenv(PATH_VARIABLE, "portable")
    assert choose_plan("cpu", jnp.float32, 10) == PORTABLE
    monkeypatch.setenv(PATH_VARIABLE, "CPU")
    assert choose_plan("gpu", jnp.float32, 10).path == "cpu"
    assert not choose_plan("gpu", jnp.float32, 10).cpu_kernel
    monkeypatch.setenv(PATH_VARIABLE, "fast")
    with pytest.raises(ValueError, match=f"{PATH_VARIABLE}='fast'.*portable, cpu"):
        choose_plan("cpu", jnp.float32, 1)


@pytest.mark.parametrize("kwargs", SETTINGS, ids=["greedy", "beam", "sample"])
def test_portable_program_has_no_custom_call_and_no_cache_window_switch(model, kwargs, monkeypatch):
    ids = np.random.default_rng(0).integers(3, 100, (2, 7))
    monkeypatch.setenv(PATH_VARIABLE, "portable")
    portable = model.lower_generate(ids, **kwargs).as_text()
    assert "custom_call" not in portable and "stablehlo.case" not in portable
    monkeypatch.setenv(PATH_VARIABLE, "cpu")  # the inspection finds the CPU path's windowed switch
    assert "stablehlo.case" in model.lower_generate(ids, **kwargs).as_text()
