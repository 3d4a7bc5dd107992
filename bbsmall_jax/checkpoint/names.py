"""PyTorch/HF checkpoint names <-> our Flax param pytree, both directions, with strict coverage.

The mapping is data: `_MODULE_TABLE` pairs each HF module name with its Flax path, and the
module kind says how its tensors are renamed and which are transposed (`Linear.weight`).
"""

from __future__ import annotations

import logging

import numpy as np

from bbsmall_jax.errors import UsageError
from bbsmall_jax.nn.config import BlenderbotSmallConfig

logger = logging.getLogger(__name__)

LINEAR, NORM, EMBED = "linear", "norm", "embed"
# kind -> {HF tensor name: (Flax leaf name, transpose?)}
_LEAVES = {
    LINEAR: {"weight": ("kernel", True), "bias": ("bias", False)},
    NORM: {"weight": ("scale", False), "bias": ("bias", False)},
    EMBED: {"weight": ("embedding", False)},
}

_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")

# (HF module name, Flax module path, kind); "{side}" is encoder/decoder, "{i}" a layer index.
_STACK_TABLE = [
    ("{side}.embed_positions", "{side}/embed_positions", EMBED),
    ("{side}.layernorm_embedding", "{side}/layernorm_embedding", NORM),
]
_LAYER_TABLE = (
    [(f"{{side}}.layers.{{i}}.self_attn.{p}", f"{{side}}/layers_{{i}}/self_attn/{p}", LINEAR) for p in _ATTENTION]
    + [
        ("{side}.layers.{i}.self_attn_layer_norm", "{side}/layers_{i}/self_attn_layer_norm", NORM),
        ("{side}.layers.{i}.fc1", "{side}/layers_{i}/ffn/fc1", LINEAR),
        ("{side}.layers.{i}.fc2", "{side}/layers_{i}/ffn/fc2", LINEAR),
        ("{side}.layers.{i}.final_layer_norm", "{side}/layers_{i}/final_layer_norm", NORM),
    ])
_CROSS_TABLE = (
    [(f"decoder.layers.{{i}}.encoder_attn.{p}", f"decoder/layers_{{i}}/encoder_attn/{p}", LINEAR)
     for p in _ATTENTION]
    + [("decoder.layers.{i}.encoder_attn_layer_norm", "decoder/layers_{i}/encoder_attn_layer_norm", NORM)])

# Names under which checkpoints store copies of the shared embedding (tied weights).
_TIED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")


def _mapping(config: BlenderbotSmallConfig, head: str) -> dict[str, tuple[tuple[str, ...], bool]]:
    """{HF tensor name (without the "model." prefix): (Flax path, transpose?)} for one head."""
    sides = ("decoder",) if head == "decoder_only" else ("encoder", "decoder")
    modules = [("shared", "shared", EMBED)]
    for side in sides:
        layers = config.encoder_layers if side == "encoder" else config.decoder_layers
        modules += [(h.format(side=side), f.format(side=side), k) for h, f, k in _STACK_TABLE]
        table = _LAYER_TABLE + (_CROSS_TABLE if side == "decoder" else [])
        for i in range(layers):
            modules += [(h.format(side=side, i=i), f.format(side=side, i=i), k) for h, f, k in table]
    mapping = {}
    for hf_module, flax_module, kind in modules:
        for hf_leaf, (flax_leaf, transpose) in _LEAVES[kind].items():
            mapping[f"{hf_module}.{hf_leaf}"] = (tuple(flax_module.split("/")) + (flax_leaf,), transpose)
    if head == "seq2seq_lm":
        mapping["final_logits_bias"] = (("final_logits_bias",), False)
    return mapping


def _strip_prefix(name: str, head: str) -> str:
    """Checkpoint name -> table name: drop the "model." wrapper prefix and alias the decoder-only embedding."""
    if name.startswith("model."):
        name = name[len("model."):]
    if head == "decoder_only" and name == "decoder.embed_tokens.weight":
        return "shared.weight"
    return name


def _ignorable(name: str, head: str) -> bool:
    """Tensors a head knowingly leaves out: another head's parts, or tied copies of `shared`."""
    if name in _TIED_ALIASES:
        return True
    if head == "seq2seq" and name == "final_logits_bias":
        return True  # the LM head's bias; the bare model has no LM head
    if head == "decoder_only" and (name.startswith("encoder.") or name == "final_logits_bias"):
        return True  # a seq2seq checkpoint loaded as a decoder-only LM keeps only the decoder
    return False


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _bad_values(value: np.ndarray) -> str:
    """What makes a weight unusable (not floating point, NaN or infinite values), or "" when it is fine."""
    if "float" not in value.dtype.name:  # float16/32/64, bfloat16 and float8 types
        return f"has dtype {value.dtype}, expected a floating-point type"
    finite = np.isfinite(value)
    if finite.all():
        return ""
    first = tuple(int(i) for i in np.argwhere(~finite)[0])
    return f"holds {int((~finite).sum())} NaN or infinite values (the first at index {first})"


def hf_to_flax(state_dict: dict[str, np.ndarray], config: BlenderbotSmallConfig, head: str,
               expected: dict[tuple[str, ...], tuple[int, ...]], dtype=np.float32) -> dict:
    """HF state dict -> Flax params of the head's module, whose param shapes by path are `expected`.

    Raises naming every missing, unexpected or mis-shaped tensor.
    """
    mapping = _mapping(config, head)
    tensors = {_strip_prefix(k, head): np.asarray(v) for k, v in state_dict.items()}
    if "shared.weight" not in tensors:  # some exports keep only a tied copy
        for alias in _TIED_ALIASES:
            if alias in tensors:
                tensors["shared.weight"] = tensors[alias]
                break
    if head == "seq2seq_lm" and "final_logits_bias" not in tensors:
        logger.info("checkpoint has no final_logits_bias; using zeros")
        tensors["final_logits_bias"] = np.zeros((config.vocab_size,), np.float32)

    unexpected = sorted(k for k in tensors if k not in mapping and not _ignorable(k, head))
    missing = sorted(k for k in mapping if k not in tensors)
    problems = [f"missing tensor {k}" for k in missing] + [f"unexpected tensor {k}" for k in unexpected]

    params: dict = {}
    assert set(expected) == {path for path, _ in mapping.values()}, "mapping table out of sync with the modules"
    for name, (path, transpose) in mapping.items():
        if name not in tensors:
            continue
        value = tensors[name]
        if name == "final_logits_bias":
            value = value.reshape(-1)  # HF stores it as [1, V]
        if transpose:
            value = value.T
        if value.shape != expected[path]:
            problems.append(f"tensor {name} has shape {tensors[name].shape}, expected "
                            f"{expected[path][::-1] if transpose else expected[path]}")
            continue
        bad_values = _bad_values(tensors[name])  # indices as the checkpoint stores the tensor
        if bad_values:
            problems.append(f"tensor {name} {bad_values}")
            continue
        _set(params, path, np.asarray(value, dtype=dtype))
    for alias in _TIED_ALIASES:
        if alias in tensors and tensors[alias] is not tensors.get("shared.weight") and not problems:
            if tensors[alias].shape != tensors["shared.weight"].shape or not np.array_equal(
                    tensors[alias], tensors["shared.weight"]):
                logger.warning("tied tensor %s differs from shared.weight; shared.weight is used", alias)
    if problems:
        more = f"; and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise UsageError(f"checkpoint cannot be loaded as a {head} model of this config: "
                         + "; ".join(problems[:8]) + more)
    return params


def flax_to_hf(params: dict, config: BlenderbotSmallConfig, head: str) -> dict[str, np.ndarray]:
    """Flax params -> HF state dict with the names transformers' own `save_pretrained` writes.

    Tied copies of the shared embedding are not written (transformers re-ties them on load).
    """
    out = {}
    for name, (path, transpose) in _mapping(config, head).items():
        try:
            value = np.asarray(_get(params, path))
        except KeyError:
            raise UsageError(f"params have no {'/'.join(path)} (needed for {name})") from None
        if transpose:
            value = value.T
        if name == "final_logits_bias":
            out[name] = value.reshape(1, -1)
        elif head == "decoder_only" and name == "shared.weight":
            out["model.decoder.embed_tokens.weight"] = value
        elif head == "seq2seq":
            out[name] = value
        else:
            out[f"model.{name}"] = value
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def flax_msgpack_to_state_dict(tree: dict) -> dict[str, np.ndarray]:
    """An old transformers Flax export's param tree -> PyTorch-style names (kernels transposed)."""
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, child in node.items():
                walk(child, prefix + [str(key)])
            return
        *modules, leaf = prefix
        value = np.asarray(node)
        if leaf == "kernel":
            leaf, value = "weight", value.T
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        out[".".join(modules + [leaf])] = value

    walk(tree.get("params", tree), [])
    return out
