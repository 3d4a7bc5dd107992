"""BlenderbotSmall in JAX/Flax: exact parity with transformers, jitted generation, fast tokenizer."""

from .config import BlenderbotSmallConfig
from .generation_config import GenerationConfig
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
    "GenerationConfig",
    "shift_tokens_right",
]
