"""Model FLOPs of a train step and the peak FLOP/s of accelerators: what MFU is computed from.

A train step's model FLOPs are 3x those of the forward pass (the backward pass does two matmuls per
forward one), and the forward pass's are 2 x the multiply-adds of every matmul at the batch's padded
shape: the attention and feed-forward projections, the attention scores and weighted sums over all key
positions (no causal discount, as PaLM's and MaxText's counts), the cross-attention keys and values over
the source, and the tied LM head over every target position. Embedding lookups, norms, softmax and the
optimizer are not counted. With L layers a side, width d, FFN width f, vocabulary V, source S and
target T tokens per example, per example:

    encoder layer   8 S d^2 + 4 S f d + 4 S^2 d
    decoder layer   8 T d^2 + 4 T^2 d            (self-attention)
                  + 4 T d^2 + 4 S d^2 + 4 T S d  (cross-attention: queries and output, keys and values)
                  + 4 T f d
    LM head         2 T d V

It is the same count for us and for transformers (which do the same matmuls; we skip the LM head's
padding rows, which only makes our MFU conservative).
"""

from __future__ import annotations

from typing import Optional

from bbsmall_jax.nn.config import BlenderbotSmallConfig

# Dense bf16 peak FLOP/s per chip by a word of jax's `device_kind`, most specific first.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12), ("H200", 989e12), ("H100", 989e12), ("GH200", 989e12), ("A100", 312e12),
    ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("v6 lite", 918e12), ("v6e", 918e12),
    ("v5 lite", 197e12), ("v5e", 197e12), ("v5p", 459e12), ("TPU v5", 459e12), ("v4", 275e12),
)


def forward_flops(config: BlenderbotSmallConfig, source_len: int, target_len: int) -> float:
    """Matmul FLOPs of one example's forward pass (see the module docstring)."""
    d, v, s, t = config.d_model, config.vocab_size, source_len, target_len
    encoder = config.encoder_layers * (8 * s * d * d + 4 * s * config.encoder_ffn_dim * d + 4 * s * s * d)
    decoder = config.decoder_layers * (8 * t * d * d + 4 * t * t * d + 4 * t * d * d + 4 * s * d * d
                                       + 4 * t * s * d + 4 * t * config.decoder_ffn_dim * d)
    return float(encoder + decoder + 2 * t * d * v)


def train_flops(config: BlenderbotSmallConfig, batch_size: int, source_len: int, target_len: int) -> float:
    """Model FLOPs of one train step over `batch_size` examples of the padded shape (source_len, target_len)."""
    return 3.0 * batch_size * forward_flops(config, source_len, target_len)


def peak_flops(device_kind: str, override: float = 0.0) -> tuple[Optional[float], str]:
    """(peak FLOP/s of one device or None when unknown, where the figure comes from)."""
    if override:
        return float(override), "given"
    for word, flops in PEAK_BF16_FLOPS:
        if word.lower() in device_kind.lower():
            return flops, f"{device_kind}, dense bf16"
    return None, f"unknown for {device_kind!r}"
