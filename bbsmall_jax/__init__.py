"""BlenderbotSmall in JAX/Flax: exact parity with transformers, jitted generation, fast tokenizer."""

from .config import BlenderbotSmallConfig
from .modeling import (
    BlenderbotSmallForCausalLM,
    BlenderbotSmallForConditionalGeneration,
    BlenderbotSmallModel,
)
from .model import shift_tokens_right

__all__ = [
    "BlenderbotSmallConfig",
    "BlenderbotSmallForCausalLM",
    "BlenderbotSmallForConditionalGeneration",
    "BlenderbotSmallModel",
    "shift_tokens_right",
]
