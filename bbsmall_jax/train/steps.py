"""The optimizer (AdamW with clipping and a warmup schedule), the loss, the train and eval steps, the train state."""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bbsmall_jax.nn.layer_stacks import stack_layers
from bbsmall_jax.nn.model import cross_entropy_loss, init_params, shift_tokens_right
from bbsmall_jax.train.config import TrainConfig
from bbsmall_jax.train.loss import lm_head_loss
from bbsmall_jax.train.packing import is_packed, packed_model_inputs
from bbsmall_jax.train.plan import TrainingPlan, default_plan
from bbsmall_jax.train.sharding import DATA_AXIS, leaf_spec, tree_shardings

FROZEN_PARAMS = ("final_logits_bias",)  # a buffer in transformers: never trained
DECAYED_LEAVES = ("kernel", "embedding")  # no weight decay on biases and LayerNorm scales (as HF's Trainer)
REMAT_POLICIES = {"dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                  "full": jax.checkpoint_policies.nothing_saveable}

State = dict  # {"params", "opt_state", "step": int32 [], "rng": uint32 [2]}


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0, then linear or cosine decay to `end_learning_rate_ratio`, or constant."""
    peak, warmup = cfg.learning_rate, cfg.warmup_steps
    decay_steps = max(cfg.total_schedule_steps - warmup, 1)
    end = peak * cfg.end_learning_rate_ratio
    if cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_learning_rate_ratio)
    else:
        decay = optax.constant_schedule(peak)
    if not warmup:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _leaf_name(path) -> str:
    return str(getattr(path[-1], "key", path[-1]))


def weight_decay_mask(params):
    """True for matrices and embeddings, False for biases, LayerNorm scales and frozen params."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) in DECAYED_LEAVES, params)


def zero_frozen(grads):
    """Zero the gradients of params transformers keeps as buffers (`final_logits_bias`)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, g: jnp.zeros_like(g) if _leaf_name(path) in FROZEN_PARAMS else g, grads)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled weight decay on matrices and embeddings)."""
    adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                        weight_decay=cfg.weight_decay, mask=weight_decay_mask)
    if cfg.max_grad_norm:
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
    return adamw


def _decoder_hidden(model, input_ids, attention_mask, decoder_input_ids, deterministic):
    """The decoder's last hidden state [B, T, D], before the LM head (a method for `module.apply`)."""
    encoded = model.encode(input_ids, attention_mask, deterministic=deterministic)
    return model.decode(decoder_input_ids, encoded.last_hidden_state, attention_mask,
                        deterministic=deterministic).last_hidden_state


def _packed_decoder_hidden(model, input_ids, inputs: dict, deterministic):
    """The decoder's last hidden state [B, T, D] of packed rows (`packing.packed_model_inputs`' `inputs`)."""
    encoded = model.encode(input_ids, inputs["encoder_mask"], deterministic=deterministic,
                           position_ids=inputs["encoder_positions"])
    return model.decode(inputs["decoder_input_ids"], encoded.last_hidden_state, inputs["cross_mask"],
                        inputs["decoder_mask"], deterministic=deterministic,
                        position_ids=inputs["decoder_positions"]).last_hidden_state


def _decoder_hidden_under_own_and_next_context(model, input_ids, attention_mask, decoder_input_ids, deterministic):
    """The decoder's last hidden states [B, T, D] under each row's own source and under the next row's (the
    last row gets the first's). The encoder runs once: rolling its output rolls the sources it encoded."""
    encoded = model.encode(input_ids, attention_mask, deterministic=deterministic).last_hidden_state
    own = model.decode(decoder_input_ids, encoded, attention_mask, deterministic=deterministic)
    next_row = model.decode(decoder_input_ids, jnp.roll(encoded, -1, axis=0), jnp.roll(attention_mask, -1, axis=0),
                            deterministic=deterministic)
    return own.last_hidden_state, next_row.last_hidden_state


def _under(mesh: Optional[Mesh]) -> contextlib.AbstractContextManager:
    """The context steps are traced in: `mesh` as the abstract mesh, whose rows loops keep sharded
    (`nn/layout.py`), when it has several devices."""
    if mesh is None or mesh.size == 1:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def _features(module, params, batch: dict, dropout_rng: Optional[jax.Array], plan: TrainingPlan,
              method=_decoder_hidden):
    """The decoder's last hidden state of one batch (what `method` returns; packed rows have their own method);
    dropout on when a key is given."""
    config, module = module.config, plan.training_module(module)
    rngs = {} if dropout_rng is None else {"dropout": plan.dropout_key(dropout_rng)}
    if is_packed(batch):
        inputs = packed_model_inputs(batch, config.pad_token_id, config.decoder_start_token_id)
        return module.apply({"params": params}, batch["input_ids"], inputs, dropout_rng is None, rngs=rngs,
                            method=_packed_decoder_hidden)
    decoder_input_ids = shift_tokens_right(batch["labels"], config.pad_token_id, config.decoder_start_token_id)
    return module.apply({"params": params}, batch["input_ids"], batch["attention_mask"], decoder_input_ids,
                        dropout_rng is None, rngs=rngs, method=method)


def _head_loss(module, params, hidden: jax.Array, labels: jax.Array, label_smoothing: float, plan: TrainingPlan,
               mesh: Optional[Mesh]):
    """(sum of per-token losses, number of target tokens) from the decoder's hidden state [B, T, D]."""
    table, bias = params["shared"]["embedding"], params.get("final_logits_bias")
    if bias is not None and "final_logits_bias" in FROZEN_PARAMS:
        bias = jax.lax.stop_gradient(bias)  # a buffer: its gradient would only be zeroed
    if plan.loss == "plain":
        logits = module.apply({"params": params}, hidden, method="logits")  # [B, T, V] float32
        count = (labels != -100).sum()
        return cross_entropy_loss(logits, labels, label_smoothing) * count, count

    def local(hidden, table, bias, labels):
        return lm_head_loss(hidden, table, bias, labels, label_smoothing, plan.loss_chunk_rows, module.dtype,
                            plan.loss_vocab_tile)

    if mesh is None or mesh.size == 1 or not plan.loss_chunk_rows:  # no chunks: nothing sized per device
        return local(hidden, table, bias, labels)

    def sharded(hidden, table, bias, labels):  # each device's rows, then the sums over devices
        # The weights as per-device values: the loss's own gradients are per device, and the transpose of
        # this cast sums them over the devices.
        table, bias = jax.lax.pcast((table, bias), DATA_AXIS, to="varying")
        total, count = local(hidden, table, bias, labels)
        return jax.lax.psum(total, DATA_AXIS), jax.lax.psum(count, DATA_AXIS)

    return jax.shard_map(sharded, mesh=mesh, in_specs=(P(DATA_AXIS), P(), P(), P(DATA_AXIS)),
                         out_specs=(P(), P()))(hidden, table, bias, labels)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gathered(x: jax.Array, whole: NamedSharding, stored: NamedSharding) -> jax.Array:
    """x laid out `whole`; its gradient laid out as x is `stored` (one reduction of the devices' partial sums)."""
    return jax.lax.with_sharding_constraint(x, whole)


def _gathered_fwd(x, whole, stored):
    return _gathered(x, whole, stored), None


def _gathered_bwd(whole, stored, _, grad):
    return (jax.lax.with_sharding_constraint(grad, stored),)


_gathered.defvjp(_gathered_fwd, _gathered_bwd)


def _with_gathered_embedding(params: dict, dtype, mesh: Mesh, fsdp: bool) -> dict:
    """The params with the tied embedding in the compute dtype, whole on every device: its three uses (two
    lookups and the LM head) read one copy, gathered once, and their gradients are summed on each device
    before one reduction over the devices (a reduce-scatter under FSDP)."""
    table = params["shared"]["embedding"]
    stored = NamedSharding(mesh, leaf_spec(table.shape, mesh, fsdp))
    gathered = _gathered(table.astype(dtype), NamedSharding(mesh, P()), stored)
    return dict(params, shared=dict(params["shared"], embedding=gathered))


def loss_sum(module, params, batch: dict, dropout_rng: Optional[jax.Array], label_smoothing: float = 0.0,
             plan: Optional[TrainingPlan] = None, mesh: Optional[Mesh] = None, remat: str = "none",
             fsdp: bool = False):
    """(sum of per-token losses, number of target tokens) of one batch; dropout on when a key is given.

    `plan` chooses the loss path (the default backend's plan when None); with a `mesh` of several devices
    the fused loss runs on each device's rows, and `fsdp` says how the params are laid out over it. `remat`
    applies to the encoder and decoder, not the head.
    """
    plan = plan or default_plan(module.dtype)
    if mesh is not None and mesh.size > 1 and plan.gather_embedding:
        params = _with_gathered_embedding(params, module.dtype, mesh, fsdp)
    features = lambda p, b, r: _features(module, p, b, r, plan)
    if remat != "none":
        features = jax.checkpoint(features, policy=REMAT_POLICIES[remat])
    with _under(mesh):
        hidden = features(params, batch, dropout_rng)
        return _head_loss(module, params, hidden, batch["labels"], label_smoothing, plan, mesh)


def make_train_step(module, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    label_smoothing: float = 0.0, remat: str = "none", plan: Optional[TrainingPlan] = None,
                    mesh: Optional[Mesh] = None, fsdp: bool = False) -> Callable:
    """`step(state, batch) -> (state, metrics)`; batch arrays are [accum, micro_batch, length].

    Gradients of the accumulation steps are summed and divided by the total number of target tokens,
    so the update equals that of one batch of all the examples.
    """
    def micro_loss(params, micro_batch, rng, denom):
        total, count = loss_sum(module, params, micro_batch, rng, label_smoothing, plan, mesh, remat, fsdp)
        return total / denom, (total, count)

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def step(state: State, batch: dict):
        params = state["params"]
        step_rng = jax.random.fold_in(state["rng"], state["step"])
        # The number of target tokens is known from the labels before any gradient: each micro-batch's loss
        # is divided by it, so the gradients come out as those of the mean (no pass over them to divide).
        denom = jnp.maximum((batch["labels"] != -100).sum(), 1).astype(jnp.float32)

        def accumulate(carry, xs):
            grads, total, count = carry
            index, micro_batch = xs
            g, (value, n) = grad_fn(params, micro_batch, jax.random.fold_in(step_rng, index), denom)
            return (jax.tree_util.tree_map(jnp.add, grads, g), total + value, count + n), None

        if batch["labels"].shape[0] == 1:  # no accumulation: skip the loop and the zero-filled accumulator
            grads, (total, count) = grad_fn(params, jax.tree_util.tree_map(lambda x: x[0], batch), step_rng, denom)
        else:
            zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
            (grads, total, count), _ = jax.lax.scan(
                accumulate, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)),
                (jnp.arange(batch["labels"].shape[0]), batch))
        grads = zero_frozen(grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_state = dict(state, params=optax.apply_updates(params, updates), opt_state=opt_state,
                         step=state["step"] + 1)
        metrics = {"loss": total / denom, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": schedule(state["step"]), "target_tokens": count}
        return new_state, metrics

    return step


def make_eval_step(module, plan: Optional[TrainingPlan] = None, mesh: Optional[Mesh] = None) -> Callable:
    """`eval_step(params, batch) -> (summed token NLL, token count, summed NLL under the next row's context)`,
    no dropout, no smoothing. The last tells how much the model uses its context (the context gain)."""
    plan = plan or default_plan(module.dtype)

    def eval_step(params, batch):
        with _under(mesh):
            own, next_row = _features(module, params, batch, None, plan,
                                      method=_decoder_hidden_under_own_and_next_context)
            total, count = _head_loss(module, params, own, batch["labels"], 0.0, plan, mesh)
            shuffled, _ = _head_loss(module, params, next_row, batch["labels"], 0.0, plan, mesh)
        return total, count, shuffled

    return eval_step


def _initial_params(module, key: jax.Array, stacked: bool) -> dict:
    params = init_params(module, key)
    return stack_layers(params, jnp) if stacked else params


def abstract_state(module, optimizer, mesh: Mesh, fsdp: bool, stacked: bool = False):
    """ShapeDtypeStructs with shardings of the whole train state; `stacked`: each stack's layers as one
    `layers` subtree of [L, ...] leaves (`nn/layer_stacks.py`), otherwise per layer as checkpoints hold them."""
    params = jax.eval_shape(lambda: _initial_params(module, jax.random.PRNGKey(0), stacked))
    shapes = {"params": params, "opt_state": jax.eval_shape(optimizer.init, params),
              "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    shardings = tree_shardings(shapes, mesh, fsdp)
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  shapes, shardings)


def init_state(module, optimizer, abstract, seed: int, host_params: Optional[dict] = None,
               stacked: bool = False) -> State:
    """A fresh train state in `abstract`'s layout (`stacked` as `abstract_state`'s): params from `host_params`
    (pretrained, per layer) or initialised with `seed`."""
    shardings = jax.tree_util.tree_map(lambda s: s.sharding, abstract)
    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
    if host_params is None:
        params = jax.jit(lambda key: _initial_params(module, key, stacked),
                         out_shardings=shardings["params"])(init_key)
    else:
        host_params = stack_layers(host_params) if stacked else host_params
        params = jax.tree_util.tree_map(
            lambda x, s: jax.make_array_from_callback(s.shape, s.sharding,
                                                      lambda idx, x=x: np.asarray(x, s.dtype)[idx]),
            host_params, abstract["params"])
    opt_state = jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(params)
    replicate = lambda x, s: jax.make_array_from_callback(s.shape, s.sharding, lambda idx: np.asarray(x)[idx])
    return {"params": params, "opt_state": opt_state, "step": replicate(np.int32(0), abstract["step"]),
            "rng": replicate(np.asarray(dropout_key, np.uint32), abstract["rng"])}
