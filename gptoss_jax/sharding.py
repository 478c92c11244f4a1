"""Logical axis names -> mesh axes, and the shardings of the model's parameters.

Parameters declare logical axes (`layers`, `vocab`, `embed`, `q_heads`, `kv_heads`, `head_dim`, `experts`,
`mlp`); a `LogicalRules` object maps them onto the mesh axes `data`, `fsdp`, `expert`, `tensor`.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gptoss_jax.mxfp4 import Mxfp4Weight

MESH_AXES = ("data", "fsdp", "expert", "tensor")

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


class LogicalRules:
    """Where each logical axis goes on the mesh: a mesh axis name, a tuple of them, or None (replicated)."""

    def __init__(self, rules: Mapping[str, str | tuple[str, ...] | None] = DEFAULT_RULES):
        for logical, target in rules.items():
            for mesh_axis in _as_tuple(target):
                if mesh_axis not in MESH_AXES:
                    raise ValueError(f"sharding rule {logical!r} -> {mesh_axis!r}: mesh axes are {MESH_AXES}")
        self.rules = dict(rules)

    def spec(self, axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
        """The partition spec of an array with these logical axes. A mesh axis the mesh lacks, or one that does not
        divide the dimension, leaves the dimension replicated; two logical axes of one array landing on the same
        mesh axis is an error."""
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
            ways = 1
            for target in targets:
                ways *= mesh.shape[target]
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
        value, axes = variable.get_value(), variable.axes
        if isinstance(value, Mxfp4Weight):
            # [..., in, out] is stored [..., out, in/32, 16] and [..., out, in/32].
            *leading, inputs, outputs = axes
            blocks_axes, scales_axes = (*leading, outputs, inputs, None), (*leading, outputs, inputs)
            sharding = Mxfp4Weight(
                NamedSharding(mesh, rules.spec(blocks_axes, value.blocks.shape, mesh)),
                NamedSharding(mesh, rules.spec(scales_axes, value.scales.shape, mesh)),
            )
        else:
            sharding = NamedSharding(mesh, rules.spec(axes, value.shape, mesh))
        return variable.replace(value=sharding)

    return jax.tree.map(sharding_of, nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable))


def _as_tuple(target) -> tuple[str, ...]:
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)
