"""BlenderbotSmall in JAX/Flax: exact parity with transformers, jitted generation, fast tokenizer.

Names are imported on first use, so `from bbsmall_jax import BlenderbotSmallTokenizer` does not load JAX.
"""

import importlib

from bbsmall_jax.platforms import skip_absent_tpu

skip_absent_tpu()  # before any JAX backend starts: an installed libtpu stays silent without a TPU

_EXPORTS = {
    "BlenderbotSmallConfig": ".nn.config",
    "BlenderbotSmallModel": ".pretrained",
    "BlenderbotSmallForConditionalGeneration": ".pretrained",
    "BlenderbotSmallForCausalLM": ".pretrained",
    "GenerationConfig": ".generation.config",
    "BlenderbotSmallTokenizer": ".text.tokenizer",
    "train_tokenizer": ".text.vocab_training",
    "shift_tokens_right": ".nn.model",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bbsmall_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
