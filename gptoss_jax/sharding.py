"""Meshes, logical axis names -> mesh axes, and placing a model on a mesh.

Parameters declare logical axes (`layers`, `vocab`, `embed`, `q_heads`, `kv_heads`, `head_dim`, `experts`,
`mlp`, `lora_rank`); a `LogicalRules` object maps them onto the mesh axes `data`, `fsdp`, `expert`, `tensor`.
With the default rules: embeddings and attention heads split over `tensor`, every parameter's model dimension
over `fsdp` (gathered where it is used), experts over `expert` — the MoE then runs expert-parallel under
`shard_map` (model.MoE) — and batches over `data` x `fsdp`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gptoss_jax.mxfp4 import Mxfp4Weight

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES = {
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "experts": "expert",
    "mlp": "tensor",
    "lora_rank": None,
}

# Splitting these unevenly is a configuration error (replicating them would silently undo the parallelism);
# other dimensions that do not divide stay replicated.
_MUST_DIVIDE = {"experts": "experts", "q_heads": "attention heads", "kv_heads": "key/value heads"}


def make_mesh(sizes: Mapping[str, int] | str, devices=None) -> Mesh:
    """A mesh with axes (data, fsdp, expert, tensor) from sizes such as {"expert": 4, "tensor": 2} or the text
    "expert=4,tensor=2"; missing axes have size 1 and one axis may be -1 (the devices left)."""
    if isinstance(sizes, str):
        sizes = _parse_sizes(sizes)
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axis {sorted(unknown)[0]!r}; the axes are {MESH_AXES}")
    devices = list(devices if devices is not None else jax.devices())
    shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
    described = ", ".join(f"{axis}={size}" for axis, size in zip(MESH_AXES, shape, strict=True))
    if any(size == 0 or size < -1 for size in shape) or shape.count(-1) > 1:
        raise ValueError(f"mesh: sizes must be positive, with at most one -1; got {described}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices do not divide into {described}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh: {described} needs {math.prod(shape)} devices, there are {len(devices)}")
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def _parse_sizes(text: str) -> dict[str, int]:
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        axis, separator, size = part.partition("=")
        if not separator or not size.strip().lstrip("-").isdigit():
            raise ValueError(f"mesh: expected AXIS=SIZE pairs like 'expert=4,tensor=2', got {part!r}")
        sizes[axis.strip()] = int(size)
    return sizes


class LogicalRules:
    """Where each logical axis goes on the mesh: a mesh axis name, a tuple of them, or None (replicated)."""

    def __init__(self, rules: Mapping[str, str | tuple[str, ...] | None] = DEFAULT_RULES):
        for logical, target in rules.items():
            for mesh_axis in _as_tuple(target):
                if mesh_axis not in MESH_AXES:
                    raise ValueError(f"sharding rule {logical!r} -> {mesh_axis!r}: mesh axes are {MESH_AXES}")
        self.rules = dict(rules)

    def spec(self, axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
        """The partition spec of an array with these logical axes. Two logical axes of one array landing on the
        same mesh axis, or experts / heads that do not split evenly, are errors."""
        claimed: dict[str, str] = {}
        spec = []
        for logical, size in zip(axes, shape, strict=True):
            if logical is not None and logical not in self.rules:
                raise ValueError(f"no sharding rule for logical axis {logical!r} (rules: {sorted(self.rules)})")
            targets = tuple(a for a in _as_tuple(self.rules.get(logical)) if mesh.shape.get(a, 1) > 1)
            for target in targets:
                if target in claimed:
                    raise ValueError(
                        f"logical axes {claimed[target]!r} and {logical!r} of one array both map to mesh axis "
                        f"{target!r}"
                    )
                claimed[target] = logical
            ways = math.prod(mesh.shape[target] for target in targets)
            if size % ways and logical in _MUST_DIVIDE:
                raise ValueError(f"{size} {_MUST_DIVIDE[logical]} cannot be split evenly over mesh axis "
                                 f"{'x'.join(targets)} of {ways} devices")
            if not targets or size % ways:
                spec.append(None)
            else:
                spec.append(targets[0] if len(targets) == 1 else targets)
        return PartitionSpec(*spec)


def param_shardings(model: nnx.Module, mesh: Mesh, rules: LogicalRules | None = None) -> nnx.State:
    """The NamedSharding of every parameter leaf (MXFP4 weights get one for their blocks and one for their
    scales), as a state with the structure of `nnx.state(model)`."""
    rules = rules or LogicalRules()

    def sharding_of(variable: nnx.Variable) -> nnx.Variable:
        value = variable.get_value()
        specs = leaf_specs(value, variable.axes, rules, mesh)
        return variable.replace(value=jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                                                   is_leaf=lambda x: isinstance(x, PartitionSpec)))

    return jax.tree.map(sharding_of, nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable))


def leaf_specs(value, axes: tuple, rules: LogicalRules, mesh: Mesh):
    """The partition spec of a parameter value; for an Mxfp4Weight, an Mxfp4Weight of its leaves' specs."""
    if isinstance(value, Mxfp4Weight):
        # [..., in, out] is stored [..., out, in/32, 16] and [..., out, in/32].
        *leading, inputs, outputs = axes
        return Mxfp4Weight(rules.spec((*leading, outputs, inputs, None), value.blocks.shape, mesh),
                           rules.spec((*leading, outputs, inputs), value.scales.shape, mesh))
    return rules.spec(axes, value.shape, mesh)


def shard_model(model: nnx.Module, mesh: Mesh, rules: LogicalRules | None = None) -> nnx.Module:
    """Places every parameter in its sharding and lets the model's layers know the mesh (the MoE runs
    expert-parallel when the mesh has an `expert` axis)."""
    rules = rules or LogicalRules()
    nnx.update(model, jax.tree.map(_moved, nnx.state(model), param_shardings(model, mesh, rules)))
    model.use_mesh(mesh, rules)
    return model


def _moved(value, sharding: jax.sharding.Sharding):
    """`value` in `sharding`: unchanged when it is there already (a model loaded onto the mesh), moved between
    this process's devices when it is an array, and placed from the host otherwise."""
    if isinstance(value, jax.Array):
        if value.sharding == sharding:
            return value
        if value.is_fully_addressable and sharding.is_fully_addressable:
            return jax.device_put(value, sharding)  # (the same sharding, spelled otherwise, keeps its buffers)
    return put(value, sharding)


def layer_sharding(stacked: jax.sharding.Sharding | None) -> jax.sharding.Sharding | None:
    """The sharding of one layer of a stacked parameter: a mesh's spec less the layer axis (an explicit mesh wants
    the two to agree); a single device's as it is."""
    if isinstance(stacked, NamedSharding):
        return NamedSharding(stacked.mesh, PartitionSpec(*stacked.spec[1:]))
    return stacked


def put(value, sharding: jax.sharding.Sharding | None, dtype=None) -> jax.Array:
    """A host value (numpy array, memory map, or an array on this process's devices) placed in `sharding`,
    each process reading only the slices its own devices hold. The value must be the same on every process.
    The result never aliases the host memory (a memory-mapped file may change later)."""
    dtype = dtype or value.dtype
    if sharding is None:
        return jax.device_put(np.array(value, dtype=dtype))
    return jax.make_array_from_callback(value.shape, sharding, lambda index: np.array(value[index], dtype=dtype))


def on_every_host(tree):
    """`tree` with every array spread over several processes gathered whole, as numpy, into every process (a
    collective: every process must call this, in the same order); the other leaves are left as they are."""
    def whole(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return leaf

    return jax.tree.map(whole, tree)


def zeros(shape: tuple[int, ...], dtype, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """Zeros in `sharding`, made where they live: each device fills only its own shard (no host copy, which for a
    stack of expert weights would be gigabytes twice over)."""
    if sharding is None:
        return jnp.zeros(shape, dtype)
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def batch_spec(batch: int, mesh: Mesh | None) -> PartitionSpec:
    """Rows over data x fsdp when they divide evenly, else replicated."""
    if mesh is None:
        return PartitionSpec()
    ways = math.prod(mesh.shape[axis] for axis in BATCH_AXES)
    return PartitionSpec(BATCH_AXES) if ways > 1 and batch % ways == 0 else PartitionSpec()


def _as_tuple(target) -> tuple[str, ...]:
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)
