"""The optimizer (AdamW with clipping and a warmup schedule), the loss, the train and eval steps, the train state."""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from bbsmall_jax.nn.model import cross_entropy_loss, init_params, shift_tokens_right
from bbsmall_jax.train.config import TrainConfig
from bbsmall_jax.train.sharding import tree_shardings

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


def loss_sum(module, params, batch: dict, dropout_rng: Optional[jax.Array], label_smoothing: float = 0.0):
    """(sum of per-token losses, number of target tokens) of one batch; dropout on when a key is given."""
    config = module.config
    labels = batch["labels"]  # [B, T], -100 on padding
    decoder_input_ids = shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)
    out = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                       decoder_input_ids=decoder_input_ids, deterministic=dropout_rng is None,
                       rngs={} if dropout_rng is None else {"dropout": dropout_rng})
    count = (labels != -100).sum()
    return cross_entropy_loss(out.logits, labels, label_smoothing) * count, count


def make_train_step(module, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    label_smoothing: float = 0.0, remat: str = "none") -> Callable:
    """`step(state, batch) -> (state, metrics)`; batch arrays are [accum, micro_batch, length].

    Gradients of the accumulation steps are summed and divided by the total number of target tokens,
    so the update equals that of one batch of all the examples.
    """
    def micro_loss(params, micro_batch, rng):
        return loss_sum(module, params, micro_batch, rng, label_smoothing)

    if remat != "none":
        micro_loss = jax.checkpoint(micro_loss, policy=REMAT_POLICIES[remat])
    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: State, batch: dict):
        params = state["params"]
        step_rng = jax.random.fold_in(state["rng"], state["step"])

        def accumulate(carry, xs):
            grads, total, count = carry
            index, micro_batch = xs
            (value, n), g = grad_fn(params, micro_batch, jax.random.fold_in(step_rng, index))
            return (jax.tree_util.tree_map(jnp.add, grads, g), total + value, count + n), None

        if batch["labels"].shape[0] == 1:  # no accumulation: skip the loop and the zero-filled accumulator
            (total, count), grads = grad_fn(params, jax.tree_util.tree_map(lambda x: x[0], batch), step_rng)
        else:
            zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
            (grads, total, count), _ = jax.lax.scan(
                accumulate, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)),
                (jnp.arange(batch["labels"].shape[0]), batch))
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = zero_frozen(jax.tree_util.tree_map(lambda g: g / denom, grads))
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_state = dict(state, params=optax.apply_updates(params, updates), opt_state=opt_state,
                         step=state["step"] + 1)
        metrics = {"loss": total / denom, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": schedule(state["step"]), "target_tokens": count}
        return new_state, metrics

    return step


def make_eval_step(module) -> Callable:
    """`eval_step(params, batch) -> (summed token NLL, token count)`, no dropout, no smoothing."""
    return lambda params, batch: loss_sum(module, params, batch, None)


def abstract_state(module, optimizer, mesh: Mesh, fsdp: bool):
    """ShapeDtypeStructs with shardings of the whole train state."""
    params = jax.eval_shape(lambda: init_params(module, jax.random.PRNGKey(0)))
    shapes = {"params": params, "opt_state": jax.eval_shape(optimizer.init, params),
              "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    shardings = tree_shardings(shapes, mesh, fsdp)
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  shapes, shardings)


def init_state(module, optimizer, abstract, seed: int, host_params: Optional[dict] = None) -> State:
    """A fresh train state: params from `host_params` (pretrained) or initialised with `seed`."""
    shardings = jax.tree_util.tree_map(lambda s: s.sharding, abstract)
    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
    if host_params is None:
        params = jax.jit(lambda key: init_params(module, key), out_shardings=shardings["params"])(init_key)
    else:
        params = jax.tree_util.tree_map(
            lambda x, s: jax.make_array_from_callback(s.shape, s.sharding,
                                                      lambda idx, x=x: np.asarray(x, s.dtype)[idx]),
            host_params, abstract["params"])
    opt_state = jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(params)
    replicate = lambda x, s: jax.make_array_from_callback(s.shape, s.sharding, lambda idx: np.asarray(x)[idx])
    return {"params": params, "opt_state": opt_state, "step": replicate(np.int32(0), abstract["step"]),
            "rng": replicate(np.asarray(dropout_key, np.uint32), abstract["rng"])}
