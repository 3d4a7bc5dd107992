"""The jitted generation program (encode, build the cache, run the search loop) and its finishing step."""

from __future__ import annotations

from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from bbsmall_jax.generation import search
from bbsmall_jax.generation.plan import DecodingPlan
from bbsmall_jax.generation.sharding import constrain_rows
from bbsmall_jax.generation.prepare import Layout, Prepared
from bbsmall_jax.nn.cache import KVCache

Array = jax.Array


@struct.dataclass
class GenerateOutput:
    """What `generate` returns with `return_dict_in_generate=True`."""

    sequences: Array  # [rows, T] int32: the prompt (or decoder start token), generated tokens, padding
    scores: Optional[tuple] = None  # per step, [rows searched, V] float32 processed scores (output_scores)
    sequences_scores: Optional[Array] = None  # beam search: [rows] length-penalised score (output_scores)


def _initial_cache(module, variables: dict, seq2seq: bool, batch: dict, rows: int, layout: Layout,
                   plan: DecodingPlan, mesh) -> KVCache:
    """The empty self-attention cache for `rows` rows, with cross-attention keys/values projected once per
    batch element and kept once: the `expand` rows (beams or samples) of a batch element share them."""
    cache = KVCache.empty(module.config, rows, layout.buffer_length, module.dtype, plan.time_major_cache)
    cache = cache.replace(entries=constrain_rows(cache.entries, mesh, 2))  # rows are axis 2 in both layouts
    if seq2seq:
        encoded = module.apply(variables, batch["input_ids"], batch["attention_mask"], method="encode")
        states, states_mask = encoded.last_hidden_state, batch["attention_mask"]
    else:
        states, states_mask = batch.get("encoder_hidden_states"), batch.get("encoder_attention_mask")
    if states is None:
        return cache
    cross = module.apply(variables, states.shape[0], 1, states, states_mask, method="init_cache")
    return cache.replace(cross_key=cross.cross_key, cross_value=cross.cross_value, encoder_mask=cross.encoder_mask)


def _step_function(module, variables: dict, seq2seq: bool, plan: DecodingPlan, weights: tuple,
                   key_mask: Optional[Array]):
    """step_fn(tokens [N, 1], cache) -> (logits [N, V] float32, cache): one decoder step and the LM head."""
    table, packed = weights
    bias = variables["params"].get("final_logits_bias")
    step_variables = plan.step_variables(variables["params"], packed)

    def step_fn(tokens: Array, cache: KVCache):
        if seq2seq:
            out = module.apply(step_variables, decoder_input_ids=tokens, cache=cache, method="decode")
        else:
            out = module.apply(step_variables, input_ids=tokens, attention_mask=key_mask, cache=cache, method="decode")
        hidden = out.last_hidden_state[:, -1]  # [N, D]
        if table is None:
            logits = module.apply(variables, hidden[:, None], method="logits")[:, 0]
        else:
            logits = plan.logits(hidden, table, bias)
        return logits, out.cache
    return step_fn


def run(module, seq2seq: bool, params, weights: tuple, batch: dict, search_inputs: search.SearchInputs,
        spec: search.SearchSpec, layout: Layout, mesh: Optional[Mesh] = None) -> dict:
    """Encode, build the cache, run the decoding loop (traced once per static configuration and shapes).

    weights: the decoding copies of the weights that `spec.plan` uses (`DecodingPlan.decoding_weights`);
    mesh: the data mesh the batch is sharded over (None on one device).
    """
    plan = spec.plan
    variables = {"params": params}
    sequences = batch["sequences"]  # [B, T] the prompt, fill beyond it
    rows = sequences.shape[0] * layout.expand
    cache = _initial_cache(module, variables, seq2seq, batch, rows, layout, plan, mesh)
    sequences = constrain_rows(jnp.repeat(sequences, layout.expand, axis=0), mesh)  # [N, T]
    key_mask = None if seq2seq else jnp.repeat(batch["key_mask"], layout.expand, axis=0)  # [N, T]
    step_fn = _step_function(module, variables, seq2seq, plan, weights, key_mask)
    if not seq2seq:  # prefill the prompt; the loop feeds its last token
        prompt = jnp.maximum(sequences[:, :layout.prompt_bucket], 0)  # the fill beyond the prompt may be -1
        cache = module.apply(variables, input_ids=prompt, attention_mask=key_mask, cache=cache, method="decode").cache
        cache = cache.replace(index=search_inputs.prompt_length - 1)

    vocab = module.config.vocab_size
    if spec.strategy == "beam":
        if plan.track_origins:
            cache = cache.tracking_origins()
        state = search.beam_search(sequences, search_inputs, cache, step_fn, lambda c, rows, _: c.reorder(rows),
                                   spec, vocab)
        return dict(sequences=state.sequences, lengths=state.lengths, scores=state.scores,
                    cur_len=state.cur_len, step_scores=state.step_scores)
    state = search.sample(sequences, search_inputs, cache, step_fn, spec, vocab)
    return dict(sequences=state.sequences, cur_len=state.cur_len, step_scores=state.scores)


def compile_program(module, seq2seq: bool, plan: DecodingPlan):
    """`run` jitted for one model and plan (the plan's layer functions and compiler options applied)."""
    return jax.jit(partial(run, plan.decoding_module(module), seq2seq), static_argnames=("spec", "layout", "mesh"),
                   compiler_options=dict(plan.compiler_options) or None)


def _returned_rows(out: dict, prepared: Prepared) -> tuple:
    """(sequences [rows returned, T], their width: the prompt and the longest output, beam scores [rows] or
    None) of the program's outputs, un-bucketed (beam search: each batch element's kept beams); host and
    device arrays alike."""
    spec, batch = prepared.spec, prepared.batch
    if spec.strategy != "beam":
        return out["sequences"][:prepared.rows_out], out["cur_len"], None
    keep = prepared.rows_out // batch
    sequences = out["sequences"][:batch, :keep].reshape(prepared.rows_out, -1)  # [B * keep, T]
    width = prepared.prompt_length + out["lengths"][:batch, :keep].max()
    return sequences, width, out["scores"][:batch, :keep].reshape(-1)


def finish(out: dict, prepared: Prepared):
    """Crop and un-bucket the program's outputs as transformers shapes them. The sequences are cropped on the
    host (slicing device arrays by these data-dependent sizes would compile a small program per shape);
    per-step scores, large, are sliced on the device."""
    spec = prepared.spec
    host = jax.device_get({name: value for name, value in out.items() if name != "step_scores"})
    sequences, width, beam_scores = _returned_rows(host, prepared)
    sequences = jax.device_put(sequences[:, :int(width)])  # jnp.asarray would compile a copy per width
    if not prepared.return_dict:
        return sequences
    if not spec.output_scores:
        return GenerateOutput(sequences=sequences)
    rows_searched = prepared.batch * spec.num_beams if spec.strategy == "beam" else prepared.rows_out
    steps = int(host["cur_len"]) - prepared.prompt_length
    scores = tuple(out["step_scores"][i, :rows_searched] for i in range(steps))
    sequences_scores = None if beam_scores is None else jax.device_put(beam_scores)
    return GenerateOutput(sequences=sequences, scores=scores, sequences_scores=sequences_scores)


def finish_traced(out: dict, prepared: Prepared):
    """The outputs of a call inside the caller's own jit, where nothing can be cropped by value: the sequences
    `finish` gives, right-padded with the pad token to `max_length` ([rows, max_length], as transformers' Flax
    `generate` shapes them)."""
    sequences, width, beam_scores = _returned_rows(out, prepared)
    max_length = int(prepared.search.max_length)
    sequences = jnp.where(jnp.arange(max_length) < width, sequences[:, :max_length], prepared.spec.pad_token_id)
    if not prepared.return_dict:
        return sequences
    return GenerateOutput(sequences=sequences, sequences_scores=beam_scores if prepared.spec.output_scores else None)
