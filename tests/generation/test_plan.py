"""The decoding plan: defaults per backend, the path asked for (a model's, the CLI's), and what the portable
program contains."""

import jax.numpy as jnp
import numpy as np
import pytest

from bbsmall_jax import BlenderbotSmallConfig, BlenderbotSmallForConditionalGeneration
from bbsmall_jax.cli.generation_flags import DECODE_PATH_VARIABLE
from bbsmall_jax.cli.main import main
from bbsmall_jax.generation.plan import PORTABLE, choose_plan
from bbsmall_jax.testing.shapes import TINY

SETTINGS = [dict(max_length=10), dict(num_beams=3, max_length=10, no_repeat_ngram_size=2),
            dict(do_sample=True, top_p=0.9, top_k=5, max_length=10)]


@pytest.fixture(scope="module")
def model():
    return BlenderbotSmallForConditionalGeneration(BlenderbotSmallConfig(**TINY), seed=1)


def test_default_path_is_cpu_on_the_cpu_backend_and_portable_elsewhere():
    for backend in ("gpu", "tpu"):
        assert choose_plan(backend, jnp.bfloat16, 64) == PORTABLE
    cpu = choose_plan("cpu", jnp.float32, 1)
    assert (cpu.path, cpu.attention, cpu.top_k, cpu.argmax, cpu.lm_head) == ("cpu", "windowed", "blockwise",
                                                                            "max_min", "tied")
    several = choose_plan("cpu", jnp.bfloat16, 10)
    assert several.lm_head == "transposed" and not several.cpu_kernel  # the kernel is float32 only


def test_a_path_asked_for_is_taken():
    assert choose_plan("cpu", jnp.float32, 10, path="portable") == PORTABLE
    assert choose_plan("gpu", jnp.float32, 10, path="CPU").path == "cpu"
    assert not choose_plan("gpu", jnp.float32, 10, path="cpu").cpu_kernel
    with pytest.raises(ValueError, match="decode_path='fast'.*portable, cpu"):
        choose_plan("cpu", jnp.float32, 1, path="fast")


def test_the_cli_reads_the_environment_once_and_the_flag_wins(monkeypatch, capsys):
    monkeypatch.setenv(DECODE_PATH_VARIABLE, "portable")
    assert main(["info"]) == 0
    assert "decoding path       portable" in capsys.readouterr().out
    assert main(["info", "--decode-path", "cpu"]) == 0
    assert "decoding path       cpu" in capsys.readouterr().out
    monkeypatch.setenv(DECODE_PATH_VARIABLE, "fast")
    assert main(["info"]) == 2
    assert f"{DECODE_PATH_VARIABLE}='fast': expected one of portable, cpu" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs", SETTINGS, ids=["greedy", "beam", "sample"])
def test_portable_program_has_no_custom_call_and_no_cache_window_switch(model, kwargs, monkeypatch):
    ids = np.random.default_rng(0).integers(3, 100, (2, 7))
    monkeypatch.setattr(model, "decode_path", "portable")
    portable = model.lower_generate(ids, **kwargs).as_text()
    assert "custom_call" not in portable and "stablehlo.case" not in portable
    model.decode_path = "cpu"  # the inspection finds the CPU path's windowed switch
    assert "stablehlo.case" in model.lower_generate(ids, **kwargs).as_text()
