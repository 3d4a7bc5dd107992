"""The Flax modules: encoder, decoder (full sequence or against a KV cache), LM head, loss."""

from __future__ import annotations

import functools
from typing import Any, Literal, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from bbsmall_jax.errors import UsageError
from bbsmall_jax.nn.cache import KVCache
from bbsmall_jax.nn.config import BlenderbotSmallConfig
from bbsmall_jax.nn.layer_functions import PLAIN, LayerFunctions
from bbsmall_jax.nn.layer_stacks import STACKED
from bbsmall_jax.nn.layers import DecoderLayer, EncoderLayer, key_mask, layer_norm, mask_to_bias
from bbsmall_jax.nn.layout import replicated, rows_sharded
from bbsmall_jax.nn.outputs import CausalLMOutput, DecoderOutput, EncoderOutput, Seq2SeqLMOutput, Seq2SeqModelOutput

Array = jax.Array
Dtype = Any
Head = Literal["seq2seq", "seq2seq_lm", "decoder_only"]  # bare model, with LM head, decoder alone


def shift_tokens_right(labels: Array, pad_token_id: int, decoder_start_token_id: int) -> Array:
    """Decoder inputs from labels: prepend the start token, drop the last label, -100 -> pad."""
    shifted = jnp.concatenate(
        [jnp.full((labels.shape[0], 1), decoder_start_token_id, labels.dtype), labels[:, :-1]], axis=1)
    return jnp.where(shifted == -100, pad_token_id, shifted)


def label_log_probs(logits: Array, labels: Array) -> tuple[Array, Array]:
    """(log_softmax(logits) at each label [...], 0 where the label is -100; the mask of real labels [...]), in
    float32: the one token log-probability of the project (losses, eval scores, the server's logprobs)."""
    valid = labels != -100
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, picked - jax.nn.logsumexp(logits, axis=-1), 0.0), valid


def cross_entropy_loss(logits: Array, labels: Array, label_smoothing: float = 0.0) -> Array:
    """Mean cross-entropy over positions whose label is not -100 (0 when there are none).

    With `label_smoothing` it equals torch's `CrossEntropyLoss(label_smoothing=...)`.
    """
    log_probs, valid = label_log_probs(logits, labels)
    nll = -log_probs
    if label_smoothing:
        logits = logits.astype(jnp.float32)
        mean_log_prob = logits.mean(axis=-1) - jax.nn.logsumexp(logits, axis=-1)  # the mean of log_softmax
        nll = (1.0 - label_smoothing) * nll - label_smoothing * mean_log_prob
    return jnp.where(valid, nll, 0.0).sum() / jnp.maximum(valid.sum(), 1)


def _run_layer_drop(module: nn.Module, rate: float, deterministic: bool, skip_value, run):
    """LayerDrop: in training, skip a layer with probability `rate` (returns `skip_value`)."""
    if deterministic or rate == 0.0:
        return run()
    drop = jax.random.uniform(module.make_rng("dropout")) < rate
    result = run()
    return jax.tree_util.tree_map(lambda skipped, ran: jnp.where(drop, skipped, ran), skip_value, result)


SCANNED_LEAVES = ("kernel", "embedding")  # leaves a scan stacks in the compute dtype (they are cast to it anyway)


def _scan_layers(module: nn.Module, layers: list, hidden: Array, deterministic: bool, apply_layer) -> Array:
    """`hidden` through `layers` (bound, identical in shape) under `lax.scan`: one layer is traced and compiled.

    The scan runs over the layers' params stacked, [L, ...] leaves, matrices in the compute dtype: the
    stack's own `layers` params when the caller keeps them so (`layer_stacks.stack_layers`, as training on
    accelerators does), else a stack of `layers_0`, `layers_1`, ... (as checkpoints name them) made per call.
    `apply_layer(params, hidden, rngs)` runs one layer; each gets its own dropout key. Each layer is
    recomputed in the backward pass, so only its input is kept (one [L, B, T, D] stack) rather than a stack
    of every intermediate. Under a 1-D mesh (the data mesh of training) the stack is gathered whole once and
    the rows stay sharded over the mesh.
    """
    def cast(path, leaf):
        return leaf.astype(module.dtype) if str(getattr(path[-1], "key", "")) in SCANNED_LEAVES else leaf

    params = module.variables["params"]
    if STACKED in params:
        stacked = params[STACKED]
    else:
        per_layer = [layer.variables["params"] for layer in layers]
        stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *per_layer)  # [L, ...]
    stacked = replicated(jax.tree_util.tree_map_with_path(cast, stacked))
    key = None if deterministic else module.make_rng("dropout")

    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
    def body(hidden, xs):
        index, params = xs
        rngs = {} if key is None else {"dropout": jax.random.fold_in(key, index)}
        return rows_sharded(apply_layer(params, rows_sharded(hidden), rngs)), None

    hidden, _ = jax.lax.scan(body, hidden, (jnp.arange(len(layers)), stacked))
    return hidden


def _scannable(module: nn.Module, layerdrop: float, deterministic: bool, *outputs: bool) -> bool:
    """Whether a stack runs its layers under `lax.scan`: asked for, and nothing per layer is needed."""
    return (module.scan_layers and not module.is_initializing() and not any(outputs)
            and (deterministic or layerdrop == 0.0))


def _embedding_init(config: BlenderbotSmallConfig):
    """normal(init_std) with the padding row zeroed, as transformers initialises embeddings."""
    def init(key, shape, dtype=jnp.float32):
        table = jax.random.normal(key, shape, dtype) * config.init_std
        if config.pad_token_id is not None:
            table = table.at[config.pad_token_id].set(0)
        return table
    return init


class _Stack(nn.Module):
    """What encoder and decoder share: the token embedding passed in, learned positions, a LayerNorm."""

    config: BlenderbotSmallConfig
    embed_tokens: nn.Embed
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False  # full-sequence passes without per-layer outputs run the layers under lax.scan
    # each layer's activations recomputed in the backward pass, not kept (transformers' gradient checkpointing)
    remat_layers: bool = False
    functions: LayerFunctions = PLAIN  # what the layers compute with (`layer_functions.py`)

    def _setup_embeddings(self):
        c = self.config
        self.embed_positions = nn.Embed(c.max_position_embeddings, c.d_model, dtype=self.dtype,
                                        param_dtype=self.param_dtype,
                                        embedding_init=nn.initializers.normal(c.init_std))
        self.layernorm_embedding = layer_norm(self.dtype, self.param_dtype, "layernorm_embedding")
        self.dropout = nn.Dropout(c.dropout)

    def _positions(self, position_ids: Optional[Array], offset, length: int) -> Array:
        """Learned position embeddings: [T, D] of positions offset..offset+T-1, or [B, T, D] at `position_ids`
        or from a per-row `offset` [B]."""
        if position_ids is None and jnp.ndim(offset) == 1:
            position_ids = offset[:, None] + jnp.arange(length, dtype=offset.dtype)  # [B, T]
        if position_ids is not None:
            return self.embed_positions(position_ids)
        return jax.lax.dynamic_slice_in_dim(self.embed_positions.embedding, offset, length).astype(self.dtype)


class Encoder(_Stack):
    """Token embeddings (shared, passed in) + learned positions -> LayerNorm -> post-LN layers."""

    def setup(self):
        self._setup_embeddings()
        c = self.config
        layer = nn.remat(EncoderLayer, static_argnums=(3,)) if self.remat_layers else EncoderLayer  # 3: deterministic
        self.layers = [layer(c, self.dtype, self.param_dtype, self.functions) for _ in range(c.encoder_layers)]

    def __call__(self, input_ids: Optional[Array] = None, attention_mask: Optional[Array] = None,
                 inputs_embeds: Optional[Array] = None, deterministic: bool = True,
                 output_hidden_states: bool = False, output_attentions: bool = False,
                 position_ids: Optional[Array] = None) -> EncoderOutput:
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids) * self.config.embed_scale
        batch, length = inputs_embeds.shape[:2]
        positions = self._positions(position_ids, 0, length)
        hidden = self.layernorm_embedding(inputs_embeds.astype(self.dtype) + positions)
        hidden = self.dropout(hidden, deterministic=deterministic)
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), bool)
        bias = mask_to_bias(key_mask(attention_mask))  # [B, 1, 1 or S, S]

        if _scannable(self, self.config.encoder_layerdrop, deterministic, output_hidden_states, output_attentions):
            layer = EncoderLayer(self.config, self.dtype, self.param_dtype, self.functions, parent=None)
            hidden = _scan_layers(self, self.layers, hidden, deterministic, lambda params, h, rngs: layer.apply(
                {"params": params}, h, bias, deterministic, rngs=rngs)[0])
            return EncoderOutput(last_hidden_state=hidden)
        all_hidden, all_weights = [hidden], []
        for layer in self.layers:
            hidden, weights = _run_layer_drop(
                self, self.config.encoder_layerdrop, deterministic, (hidden, jnp.zeros((), jnp.float32)),
                lambda: layer(hidden, bias, deterministic))
            all_hidden.append(hidden)
            all_weights.append(weights)
        return EncoderOutput(
            last_hidden_state=hidden,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_weights) if output_attentions else None)


class Decoder(_Stack):
    """LayerNorm(token embeddings) + learned positions -> post-LN layers with cross-attention.

    Runs either over a whole sequence (causal mask) or, given a `KVCache`, over new tokens at
    `cache.index` (one token per step in generation, or several to prefill).
    """

    def setup(self):
        self._setup_embeddings()
        c = self.config
        layer = nn.remat(DecoderLayer, static_argnums=(5,)) if self.remat_layers else DecoderLayer  # 5: deterministic
        self.layers = [layer(c, i, self.dtype, self.param_dtype, self.functions) for i in range(c.decoder_layers)]

    def project_cross_key_value(self, encoder_hidden_states: Array) -> tuple[Array, Array]:
        """Cross-attention keys and values of every layer, stacked: [L, B, S, H, Dh] each."""
        pairs = [layer.project_cross_key_value(encoder_hidden_states) for layer in self.layers]
        return jnp.stack([k for k, _ in pairs]), jnp.stack([v for _, v in pairs])

    def _self_attention_bias(self, length: int, attention_mask: Optional[Array],
                             cache: Optional[KVCache]) -> tuple[Array, Optional[Array]]:
        """Biases among the T input tokens (causal, [B or 1, 1, T, T]) and over the cached keys.

        The cache bias [B or 1, 1, 1, max_len] allows the keys before `cache.index` (None without a cache;
        [B, ...] for a per-row index).
        Both take key padding from `attention_mask`: [B, T] without a cache, [B, max_len] with one; without a
        cache it may also be a full mask [B, T, T] (packed sequences), combined with the causal one.
        """
        positions = jnp.arange(length)
        allowed = (positions[None, :] <= positions[:, None])[None, None]  # [1, 1, T, T]
        if cache is None:
            if attention_mask is not None:
                allowed = allowed & key_mask(attention_mask)
            return mask_to_bias(allowed), None
        index = jnp.reshape(cache.index, (-1, 1, 1, 1))  # [B or 1, 1, 1, 1]
        cached = jnp.arange(cache.max_length)[None, None, None, :] < index  # [B or 1, 1, 1, K]
        if attention_mask is not None:
            if jnp.ndim(cache.index) == 1:
                raise UsageError("an attention_mask over the cache needs one index for all rows")
            mask = attention_mask.astype(bool)
            cached = cached & mask[:, None, None, :]
            allowed = allowed & jax.lax.dynamic_slice_in_dim(mask, cache.index, length, axis=1)[:, None, None, :]
        return mask_to_bias(allowed), mask_to_bias(cached)

    def __call__(self, input_ids: Optional[Array] = None, attention_mask: Optional[Array] = None,
                 encoder_hidden_states: Optional[Array] = None, encoder_attention_mask: Optional[Array] = None,
                 inputs_embeds: Optional[Array] = None, cache: Optional[KVCache] = None,
                 deterministic: bool = True, output_hidden_states: bool = False,
                 output_attentions: bool = False, position_ids: Optional[Array] = None) -> DecoderOutput:
        c = self.config
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        # As transformers 4.46-4.52: the scale applies after choosing, so embeddings passed in are scaled too.
        inputs_embeds = inputs_embeds * c.decoder_embed_scale
        length = inputs_embeds.shape[1]
        offset = 0 if cache is None else cache.index
        positions = self._positions(position_ids, offset, length)
        hidden = self.layernorm_embedding(inputs_embeds.astype(self.dtype)) + positions
        hidden = self.dropout(hidden, deterministic=deterministic)
        self_bias, cache_bias = self._self_attention_bias(length, attention_mask, cache)

        cached_cross = cache is not None and cache.cross_key is not None
        encoder_mask = (cache.encoder_mask if cached_cross else
                        encoder_attention_mask if encoder_hidden_states is not None else None)
        cross_bias = None if encoder_mask is None else mask_to_bias(key_mask(encoder_mask))  # [B, 1, 1 or T, S]
        if cache is None and _scannable(self, c.decoder_layerdrop, deterministic, output_hidden_states,
                                        output_attentions):
            layer = DecoderLayer(c, 0, self.dtype, self.param_dtype, self.functions, parent=None)
            hidden = _scan_layers(self, self.layers, hidden, deterministic, lambda params, h, rngs: layer.apply(
                {"params": params}, h, self_bias, encoder_hidden_states, cross_bias, deterministic, rngs=rngs,
                method="over_sequence"))
            return DecoderOutput(last_hidden_state=hidden)

        if cached_cross:
            cross_kv = [(cache.cross_key[i], cache.cross_value[i]) for i in range(len(self.layers))]
        elif encoder_hidden_states is not None:
            # Each layer's own projection, not stacked: the gradient of a stack read back by layer would be
            # built from every layer's padded slice (XLA's CPU backend spent 12% of a train step on it).
            cross_kv = [layer.project_cross_key_value(encoder_hidden_states) for layer in self.layers]
        else:
            cross_kv = None
        all_hidden, all_self, all_cross, new_kv = [hidden], [], [], []
        for i, layer in enumerate(self.layers):
            layer_cross = None if cross_kv is None else cross_kv[i]
            outputs = _run_layer_drop(
                self, c.decoder_layerdrop if cache is None else 0.0, deterministic,
                (hidden, jnp.zeros((), jnp.float32), None if cross_kv is None else jnp.zeros((), jnp.float32),
                 (jnp.zeros((), self.dtype), jnp.zeros((), self.dtype))),
                lambda: layer(hidden, self_bias, layer_cross, cross_bias, deterministic, cache, cache_bias))
            hidden, self_weights, cross_weights, kv = outputs
            all_hidden.append(hidden)
            all_self.append(self_weights)
            all_cross.append(cross_weights)
            new_kv.append(kv)

        if cache is not None:  # every layer's new entries written once, after all reads of the old buffers
            cache = cache.write(jnp.stack([k for k, _ in new_kv]), jnp.stack([v for _, v in new_kv]),
                                self.functions.write_index(cache.index, hidden))
        return DecoderOutput(
            last_hidden_state=hidden,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_self) if output_attentions else None,
            cross_attentions=tuple(all_cross) if output_attentions and cross_kv is not None else None,
            cache=cache)


class _Base(nn.Module):
    """The shared embedding, the LM head over it, and cache construction."""

    config: BlenderbotSmallConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan_layers: bool = False  # see `_Stack`
    remat_layers: bool = False  # see `_Stack`
    functions: LayerFunctions = PLAIN  # see `_Stack`

    def _make_shared(self):
        c = self.config
        return nn.Embed(c.vocab_size, c.d_model, dtype=self.dtype, param_dtype=self.param_dtype,
                        embedding_init=_embedding_init(c), name="shared")

    def _tied_logits(self, hidden: Array, bias: Optional[Array] = None) -> Array:
        """[B, T, D] -> [B, T, V] float32 over the shared embedding [V, D] (+ bias [V])."""
        logits = jnp.einsum("btd,vd->btv", hidden.astype(self.dtype), self.shared.embedding.astype(self.dtype),
                            preferred_element_type=jnp.float32)
        return logits if bias is None else logits + bias.astype(jnp.float32)

    def init_cache(self, batch_size: int, max_length: int, encoder_hidden_states: Optional[Array] = None,
                   encoder_attention_mask: Optional[Array] = None) -> KVCache:
        """A zeroed self-attention cache; cross-attention keys/values projected once when given."""
        cache = KVCache.empty(self.config, batch_size, max_length, self.dtype)
        if encoder_hidden_states is None:
            return cache
        if encoder_attention_mask is None:
            encoder_attention_mask = jnp.ones(encoder_hidden_states.shape[:2], bool)
        cross_key, cross_value = self.decoder.project_cross_key_value(encoder_hidden_states)
        return cache.replace(cross_key=cross_key, cross_value=cross_value,
                             encoder_mask=encoder_attention_mask.astype(bool))


class BlenderbotSmallSeq2Seq(_Base):
    """Encoder-decoder; with `lm_head` the tied LM head plus `final_logits_bias`."""

    lm_head: bool = True

    def setup(self):
        self.shared = self._make_shared()
        self.encoder = Encoder(self.config, self.shared, self.dtype, self.param_dtype, self.scan_layers,
                               self.remat_layers, self.functions)
        self.decoder = Decoder(self.config, self.shared, self.dtype, self.param_dtype, self.scan_layers,
                               self.remat_layers, self.functions)
        if self.lm_head:
            self.final_logits_bias = self.param(
                "final_logits_bias", nn.initializers.zeros, (self.config.vocab_size,), self.param_dtype)

    def encode(self, input_ids=None, attention_mask=None, inputs_embeds=None, deterministic=True,
               output_hidden_states=False, output_attentions=False, position_ids=None) -> EncoderOutput:
        """Run the encoder (positions 0..S-1, or `position_ids` [B, S])."""
        return self.encoder(input_ids, attention_mask, inputs_embeds, deterministic,
                            output_hidden_states, output_attentions, position_ids)

    def decode(self, decoder_input_ids=None, encoder_hidden_states=None, encoder_attention_mask=None,
               decoder_attention_mask=None, decoder_inputs_embeds=None, cache=None, deterministic=True,
               output_hidden_states=False, output_attentions=False, position_ids=None) -> DecoderOutput:
        """Run the decoder over a full sequence, or over new tokens against `cache` (positions from
        `cache.index` on, or `position_ids` [B, T])."""
        return self.decoder(decoder_input_ids, decoder_attention_mask, encoder_hidden_states,
                            encoder_attention_mask, decoder_inputs_embeds, cache, deterministic,
                            output_hidden_states, output_attentions, position_ids)

    def logits(self, hidden: Array) -> Array:
        """LM head: the tied embedding plus `final_logits_bias`, float32 [B, T, V]."""
        return self._tied_logits(hidden, self.final_logits_bias)

    def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None,
                 decoder_attention_mask=None, encoder_outputs: Optional[EncoderOutput] = None,
                 inputs_embeds=None, decoder_inputs_embeds=None, labels=None, deterministic=True,
                 output_hidden_states=False, output_attentions=False, position_ids=None, decoder_position_ids=None):
        """Full forward: `Seq2SeqLMOutput` with the LM head, else `Seq2SeqModelOutput`."""
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id,
                                                   self.config.decoder_start_token_id)
        if encoder_outputs is None:
            encoder_outputs = self.encode(input_ids, attention_mask, inputs_embeds, deterministic,
                                          output_hidden_states, output_attentions, position_ids)
        decoded = self.decode(decoder_input_ids, encoder_outputs.last_hidden_state, attention_mask,
                              decoder_attention_mask, decoder_inputs_embeds, None, deterministic,
                              output_hidden_states, output_attentions, decoder_position_ids)
        common = dict(encoder_last_hidden_state=encoder_outputs.last_hidden_state,
                      decoder_hidden_states=decoded.hidden_states, decoder_attentions=decoded.attentions,
                      cross_attentions=decoded.cross_attentions,
                      encoder_hidden_states=encoder_outputs.hidden_states,
                      encoder_attentions=encoder_outputs.attentions)
        if not self.lm_head:
            return Seq2SeqModelOutput(last_hidden_state=decoded.last_hidden_state, **common)
        logits = self.logits(decoded.last_hidden_state)
        loss = None if labels is None else cross_entropy_loss(logits, labels)
        return Seq2SeqLMOutput(logits=logits, loss=loss, **common)


class BlenderbotSmallDecoderOnly(_Base):
    """The decoder alone (transformers' `BlenderbotSmallForCausalLM`), LM head tied, no logits bias."""

    def setup(self):
        self.shared = self._make_shared()
        self.decoder = Decoder(self.config, self.shared, self.dtype, self.param_dtype, self.scan_layers,
                               self.remat_layers, self.functions)

    def decode(self, input_ids=None, attention_mask=None, encoder_hidden_states=None,
               encoder_attention_mask=None, inputs_embeds=None, cache=None, deterministic=True,
               output_hidden_states=False, output_attentions=False, position_ids=None) -> DecoderOutput:
        """Run the decoder over a full sequence, or over new tokens against `cache` (positions from
        `cache.index` on, or `position_ids` [B, T])."""
        return self.decoder(input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask,
                            inputs_embeds, cache, deterministic, output_hidden_states, output_attentions,
                            position_ids)

    def logits(self, hidden: Array) -> Array:
        """LM head: the tied embedding, float32 [B, T, V]."""
        return self._tied_logits(hidden)

    def __call__(self, input_ids=None, attention_mask=None, encoder_hidden_states=None,
                 encoder_attention_mask=None, inputs_embeds=None, labels=None, logits_to_keep: int = 0,
                 deterministic=True, output_hidden_states=False, output_attentions=False) -> CausalLMOutput:
        """Full forward; labels are not shifted (`labels[:, i]` is the target of position i)."""
        decoded = self.decode(input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask,
                              inputs_embeds, None, deterministic, output_hidden_states, output_attentions)
        hidden = decoded.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.logits(hidden)
        loss = None if labels is None else cross_entropy_loss(logits, labels)
        return CausalLMOutput(logits=logits, loss=loss, hidden_states=decoded.hidden_states,
                              attentions=decoded.attentions, cross_attentions=decoded.cross_attentions)


def build_module(config: BlenderbotSmallConfig, head: Head, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, scan_layers: bool = False, remat_layers: bool = False,
                 functions: LayerFunctions = PLAIN) -> nn.Module:
    """The Flax module of one head; `scan_layers` runs full-sequence passes under `lax.scan` (a training plan's
    choice: the params stay per layer); `remat_layers` recomputes each layer in the backward pass; the layers
    compute with `functions` (a backend plan's choice)."""
    if head == "decoder_only":
        return BlenderbotSmallDecoderOnly(config, dtype, param_dtype, scan_layers, remat_layers, functions)
    if head not in ("seq2seq", "seq2seq_lm"):
        raise UsageError(f"unknown head {head!r}")
    return BlenderbotSmallSeq2Seq(config, dtype, param_dtype, scan_layers, remat_layers, functions,
                                  lm_head=head == "seq2seq_lm")


def init_params(module: nn.Module, rng: jax.Array) -> dict:
    """Randomly initialised params of `module` (every parameter, cross-attention included)."""
    tokens = jnp.ones((1, 1), jnp.int32)
    if isinstance(module, BlenderbotSmallDecoderOnly):
        encoder_states = jnp.zeros((1, 1, module.config.d_model), module.dtype)
        variables = module.init(rng, tokens, encoder_hidden_states=encoder_states)
    else:
        variables = module.init(rng, tokens, decoder_input_ids=tokens)
    return variables["params"]


def param_shapes(module: nn.Module) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Path -> shape of every parameter, read from the module's own (abstract) `init`."""
    abstract = jax.eval_shape(lambda: init_params(module, jax.random.PRNGKey(0)))
    return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(abstract).items()}
