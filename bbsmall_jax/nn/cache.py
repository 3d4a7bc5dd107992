"""The static decoder KV cache: an explicit pytree owned by the decoding loop."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from bbsmall_jax.errors import UsageError
from bbsmall_jax.nn.config import BlenderbotSmallConfig


@struct.dataclass
class KVCache:
    """Preallocated self-attention keys/values plus the cross-attention keys/values projected once.

    `index` is the position the next decoder token is written to (one for all layers): [] for rows that
    move together, or [B] for rows at their own positions (a decode engine's slots; one token per write).

    The self-attention keys and values of every layer are one buffer, `entries`, with heads merged
    ([.., H * Dh]: split, head_dim 32 would fill a quarter of each 128-wide TPU tile). Two layouts, a
    decoding plan's choice: layer-major [2, L, B, max_len, D] (keys, then values) keeps each row's history
    contiguous; `time_major` [max_len, 2 * L, B, D] (keys of layer l at l, values at L + l) makes a step's
    write one contiguous block, which XLA's TPU backend updates in place (a position inside its tiles would
    be rewritten whole). `history` and `history_by_position` read either.

    Beam search moves histories between rows every step. Copying the buffers to follow them would cost a
    read and a write of the whole buffer per step, so with `origins` set the entries stay where they
    were written and `origins[b, t]` names the buffer row that holds position t of row b's history;
    attention reads through it. Without `origins`, row b's history is buffer row b.
    """

    entries: jax.Array  # self-attention keys and values, [2, L, B, max_len, D] or time-major [max_len, 2L, B, D]
    index: jax.Array  # [] int32, or [B] int32: each row's own position
    # cross-attention entries [L, G, S, H, Dh], G = B or dividing it: each group of B / G consecutive rows
    # (the beams of one batch element) shares one; None for a decoder without encoder
    cross_key: Optional[jax.Array] = None
    cross_value: Optional[jax.Array] = None  # [L, G, S, H, Dh]
    encoder_mask: Optional[jax.Array] = None  # [G, S] bool, True where the encoder output is real
    origins: Optional[jax.Array] = None  # [B, max_len] int32 buffer row of each cached position (see above)
    time_major: bool = struct.field(pytree_node=False, default=False)  # the layout of `entries` (see above)

    @classmethod
    def empty(cls, config: BlenderbotSmallConfig, batch_size: int, max_length: int, dtype=jnp.float32,
              time_major: bool = False) -> "KVCache":
        """A zeroed self-attention cache of `max_length` positions, without cross-attention entries."""
        layers, width = config.decoder_layers, config.d_model
        shape = ((max_length, 2 * layers, batch_size, width) if time_major
                 else (2, layers, batch_size, max_length, width))
        return cls(entries=jnp.zeros(shape, dtype), index=jnp.zeros((), jnp.int32), time_major=time_major)

    @property
    def max_length(self) -> int:
        return self.entries.shape[0 if self.time_major else 3]

    @property
    def rows(self) -> int:
        return self.entries.shape[2]

    @property
    def layers(self) -> int:
        return self.entries.shape[1] // 2 if self.time_major else self.entries.shape[1]

    def tracking_origins(self) -> "KVCache":
        """This cache with `origins` set (each row's history in its own buffer row), so `reorder` is cheap."""
        return self.replace(origins=_own_rows(self.rows, self.max_length))

    def write(self, key: jax.Array, value: jax.Array, index: Optional[jax.Array] = None) -> "KVCache":
        """Write new entries key/value [L, B, T, H, Dh] at `index` (default: the cache's own) and advance the
        cache's index by T.

        With a per-row index [B], each row's one new token goes to its own position (a scatter).
        """
        index = self.index if index is None else index
        new = jnp.stack([key, value]).astype(self.entries.dtype)  # [2, L, B, T, H, Dh]
        new = new.reshape(new.shape[:4] + (-1,))  # [2, L, B, T, D]
        if jnp.ndim(index) == 1:
            return self._write_per_row(new, index)
        if self.time_major:
            new = jnp.transpose(new.reshape((-1,) + new.shape[2:]), (2, 0, 1, 3))  # [T, 2L, B, D]
            start = (index, 0, 0, 0)
        else:
            start = (0, 0, 0, index, 0)
        origins = self.origins
        if origins is not None:  # the new positions of every row are in its own buffer row
            origins = jax.lax.dynamic_update_slice(origins, _own_rows(key.shape[1], key.shape[2]), (0, self.index))
        return self.replace(entries=jax.lax.dynamic_update_slice(self.entries, new, start),
                            index=self.index + key.shape[2], origins=origins)

    def _write_per_row(self, new: jax.Array, index: jax.Array) -> "KVCache":
        """`write` of one token per row, new [2, L, B, 1, D], row b's at its own position index[b]."""
        if new.shape[3] != 1:
            raise UsageError(f"a cache with a position per row takes one new token per row, got {new.shape[3]}")
        rows = jnp.arange(self.rows, dtype=jnp.int32)
        new = new[:, :, :, 0]  # [2, L, B, D]
        if self.time_major:  # entries [T, 2L, B, D]: (position, row) pairs pick [B] blocks of [2L, D]
            block = jnp.transpose(new.reshape((-1,) + new.shape[2:]), (1, 0, 2))  # [B, 2L, D]
            entries = self.entries.at[index, :, rows, :].set(block, mode="drop")
        else:  # entries [2, L, B, T, D]: (row, position) pairs pick [2, L, B, D]
            entries = self.entries.at[:, :, rows, index, :].set(new, mode="drop")
        origins = self.origins
        if origins is not None:
            origins = origins.at[rows, self.index].set(rows, mode="drop")
        return self.replace(entries=entries, index=self.index + 1, origins=origins)

    def reorder(self, batch_indices: jax.Array) -> "KVCache":
        """Row b takes over the self-attention history of row `batch_indices[b]` (beam search's reorder).

        With `origins` only they are gathered; otherwise the buffer is. Cross-attention entries are
        left alone: beams never move between batch elements, so they are the same for every beam of one.
        """
        moved = self
        if jnp.ndim(self.index) == 1:  # each row's position goes with its history
            moved = self.replace(index=jnp.take(self.index, batch_indices, mode="clip"))
        if self.origins is not None:
            return moved.replace(origins=jnp.take(self.origins, batch_indices, axis=0, mode="clip"))
        # mode="clip": the indices are in range, and XLA's clipping gather is several times faster than "fill".
        # One gather per layer, on its leading axis: a single gather along the rows' axis makes XLA lay the
        # buffer out row-major, and every per-layer read of it then copies the whole buffer to slice it.
        if self.time_major:
            return moved.replace(entries=jnp.take(self.entries, batch_indices, axis=2, mode="clip"))
        by_layer = [[jnp.take(self.entries[kind, layer], batch_indices, axis=0, mode="clip")
                     for layer in range(self.layers)] for kind in range(2)]
        return moved.replace(entries=jnp.stack([jnp.stack(kind) for kind in by_layer]))

    def history(self, layer: int, width: int) -> tuple[jax.Array, jax.Array]:
        """Every row's keys and values in the first `width` positions of one layer: [B, width, D] each.

        Layer-major, this is a slice, or with `origins` [B, K] a gather from the whole buffer (seen as
        [2 * L * B * K, D]), which XLA fuses into the attention that reads it.
        """
        if self.time_major:
            return tuple(jnp.swapaxes(x[:width], 0, 1) for x in self.history_by_position(layer))
        if self.origins is None:
            return self.entries[0, layer, :, :width], self.entries[1, layer, :, :width]
        _, layers, rows, length, width_d = self.entries.shape
        flat = self.entries.reshape(-1, width_d)  # [2 * L * B * K, D]
        rows_of = (layer * rows + self.origins[:, :width]) * length + jnp.arange(width, dtype=jnp.int32)  # [B, w]
        return tuple(jnp.take(flat, kind * layers * rows * length + rows_of, axis=0, mode="clip")
                     for kind in range(2))

    def history_by_position(self, layer: int) -> tuple[jax.Array, jax.Array]:
        """Every row's keys and values of one layer, position first: [K, B, D] each.

        Time-major, this is a gather of rows from the whole buffer (seen as [K * 2L * B, D]), through
        `origins` when set; XLA's TPU backend fuses it into the attention that reads it, which then reads
        only this layer's rows (a strided slice would be read whole there).
        """
        if not self.time_major:
            return tuple(jnp.swapaxes(x, 0, 1) for x in self.history(layer, self.max_length))
        length, stacked, rows, width_d = self.entries.shape
        flat = self.entries.reshape(-1, width_d)  # [K * 2L * B, D]
        positions = jnp.arange(length, dtype=jnp.int32)[:, None] * stacked  # [K, 1]
        origins = jnp.arange(rows, dtype=jnp.int32)[None, :] if self.origins is None else self.origins.T  # [K, B]
        return tuple(jnp.take(flat, (positions + at) * rows + origins, axis=0, mode="clip")
                     for at in (layer, self.layers + layer))


def _own_rows(rows: int, length: int) -> jax.Array:
    """Origins [rows, length] saying that every row's positions are in its own buffer row."""
    return jnp.broadcast_to(jnp.arange(rows, dtype=jnp.int32)[:, None], (rows, length))
