"""The static decoder KV cache: an explicit pytree owned by the decoding loop."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from bbsmall_jax.nn.config import BlenderbotSmallConfig


@struct.dataclass
class KVCache:
    """Preallocated self-attention keys/values plus the cross-attention keys/values projected once.

    `index` is the position the next decoder token is written to (one for all layers).

    Beam search moves histories between rows every step. Copying the buffers to follow them would cost a
    read and a write of both whole buffers per step, so with `origins` set the entries stay where they
    were written and `origins[b, t]` names the buffer row that holds position t of row b's history;
    attention reads through it (`read_layer`). Without `origins`, row b's history is buffer row b.
    """

    self_key: jax.Array  # [L, B, max_len, H, Dh]
    self_value: jax.Array  # [L, B, max_len, H, Dh]
    index: jax.Array  # [] int32
    # cross-attention entries [L, G, S, H, Dh], G = B or dividing it: each group of B / G consecutive rows
    # (the beams of one batch element) shares one; None for a decoder without encoder
    cross_key: Optional[jax.Array] = None
    cross_value: Optional[jax.Array] = None  # [L, G, S, H, Dh]
    encoder_mask: Optional[jax.Array] = None  # [G, S] bool, True where the encoder output is real
    origins: Optional[jax.Array] = None  # [B, max_len] int32 buffer row of each cached position (see above)
    # whether `write` makes its position depend on the step's output (a decoding plan's choice, see `write`)
    ordered_writes: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def empty(cls, config: BlenderbotSmallConfig, batch_size: int, max_length: int,
              dtype=jnp.float32) -> "KVCache":
        """A zeroed self-attention cache of `max_length` positions, without cross-attention entries."""
        heads = config.decoder_attention_heads
        shape = (config.decoder_layers, batch_size, max_length, heads, config.d_model // heads)
        return cls(self_key=jnp.zeros(shape, dtype), self_value=jnp.zeros(shape, dtype),
                   index=jnp.zeros((), jnp.int32))

    @property
    def max_length(self) -> int:
        return self.self_key.shape[2]

    def tracking_origins(self) -> "KVCache":
        """This cache with `origins` set (each row's history in its own buffer row), so `reorder` is cheap."""
        return self.replace(origins=_own_rows(self.self_key.shape[1], self.max_length))

    def write(self, key: jax.Array, value: jax.Array, output: jax.Array) -> "KVCache":
        """Write new entries key/value [L, B, T, H, Dh] at `index` and advance it by T.

        `output`: an array computed from every read of the old buffers (the decoder's output). With
        `ordered_writes` the write position is made to depend on it, which shows XLA's CPU backend that the
        reads come first, so it updates the buffers in place instead of copying both on every step.
        """
        index = self.index
        if self.ordered_writes:  # min(isnan(.), 0) is always 0, but XLA cannot fold it away
            index = index + jnp.minimum(jnp.isnan(jnp.sum(output)).astype(jnp.int32), 0)
        start = (0, 0, index, 0, 0)
        origins = self.origins
        if origins is not None:  # the new positions of every row are in its own buffer row
            origins = jax.lax.dynamic_update_slice(origins, _own_rows(key.shape[1], key.shape[2]), (0, self.index))
        return self.replace(
            self_key=jax.lax.dynamic_update_slice(self.self_key, key.astype(self.self_key.dtype), start),
            self_value=jax.lax.dynamic_update_slice(self.self_value, value.astype(self.self_value.dtype), start),
            index=self.index + key.shape[2], origins=origins)

    def reorder(self, batch_indices: jax.Array) -> "KVCache":
        """Row b takes over the self-attention history of row `batch_indices[b]` (beam search's reorder).

        With `origins` only they are gathered; otherwise the buffers are. Cross-attention entries are
        left alone: beams never move between batch elements, so they are the same for every beam of one.
        """
        if self.origins is not None:
            return self.replace(origins=jnp.take(self.origins, batch_indices, axis=0, mode="clip"))
        # mode="clip": the indices are in range, and XLA's clipping gather is several times faster than "fill".
        # One gather per layer, on its leading axis: a single gather along axis 1 makes XLA lay the buffers
        # out batch-major, and every per-layer read of them then copies the whole buffer to slice it.
        def gather(buffer: jax.Array) -> jax.Array:
            return jnp.stack([jnp.take(buffer[layer], batch_indices, axis=0, mode="clip")
                              for layer in range(buffer.shape[0])])

        return self.replace(self_key=gather(self.self_key), self_value=gather(self.self_value))


def _own_rows(rows: int, length: int) -> jax.Array:
    """Origins [rows, length] saying that every row's positions are in its own buffer row."""
    return jnp.broadcast_to(jnp.arange(rows, dtype=jnp.int32)[:, None], (rows, length))


def read_layer(buffer: jax.Array, layer: int, width: int, origins: Optional[jax.Array]) -> jax.Array:
    """Every row's history in the first `width` positions of one layer's buffer.

    buffer [L, B, K, H, Dh] -> [B, width, H, Dh]. With `origins` [B, K] this is a gather from the whole
    stacked buffer (seen as [L * B * K, H, Dh]), which XLA fuses into the attention that reads it.
    """
    if origins is None:
        return buffer[layer, :, :width]
    layers, rows, length = buffer.shape[:3]
    flat = buffer.reshape((layers * rows * length,) + buffer.shape[3:])  # [L * B * K, H, Dh]
    index = (layer * rows + origins[:, :width]) * length + jnp.arange(width, dtype=jnp.int32)  # [B, width]
    return jnp.take(flat, index, axis=0, mode="clip")
