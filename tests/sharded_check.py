"""Run by tests/test_sharding.py in a fresh interpreter with 8 CPU devices (or as one of two jax.distributed
processes): loads a checkpoint on several meshes and writes the logits and greedy tokens of each to a file, and
the checks each mesh names: "adapted" (logits and adapter gradients of LoRA on every target), "qat" (the same
with quantization-aware training).

    python sharded_check.py CHECKPOINT '{"MESH": ["adapted", "qat"], ...}' OUTPUT [PROCESS_ID PROCESS_COUNT PORT]
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import gptoss_jax
from gptoss_jax.generation import Generator
from gptoss_jax.lora import LoraConfig, add_lora
from gptoss_jax.sharding import make_mesh, on_every_host, shard_model


def main(checkpoint: str, meshes: dict[str, list[str]], output: str) -> None:
    tokens = np.random.default_rng(0).integers(0, 300, (4, 11)).astype(np.int32)
    prompts = [tokens[0, :9].tolist(), tokens[1, :3].tolist()]
    results = {}
    for spec, checks in meshes.items():
        mesh = make_mesh(spec) if spec else None
        model = gptoss_jax.load_model(checkpoint, dtype="float32", mesh=mesh)
        placed = jax.device_put(tokens, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())) \
            if mesh is not None else tokens
        logits = nnx.jit(lambda m, t: m(t))(model, placed)
        generated = Generator(model).generate(prompts, 12, stop_tokens=[])
        results[spec] = {"logits": _host(logits).tolist(), "generated": generated}
        # adapters on every target (random b), expert-parallel LoRA included; and the same trained for an MXFP4
        # export (QAT: the experts through Q(W + delta))
        for name in checks:
            adapted = gptoss_jax.load_model(checkpoint, dtype="float32", qat=name == "qat")
            add_lora(adapted, LoraConfig(rank=2, targets=("*",)), rngs=nnx.Rngs(1))
            adapters = nnx.state(adapted, gptoss_jax.model.LoRAParam)
            nnx.update(adapted, jax.tree.map(lambda a: a + 0.05, adapters))
            if mesh is not None:
                shard_model(adapted, mesh)
            results[spec][name] = _host(nnx.jit(lambda m, t: m(t))(adapted, placed)).tolist()
            # the adapters' gradients: the dispatch's and the grouped matmul's custom VJPs under shard_map
            graphdef, adapters, rest = nnx.split(adapted, gptoss_jax.model.LoRAParam, ...)
            grads = jax.jit(jax.grad(lambda a, r, g=graphdef, t=placed: jnp.mean(nnx.merge(g, a, r)(t) ** 2)))(
                adapters, rest)
            results[spec][f"{name}_grads"] = np.concatenate([_host(g).ravel() for g in jax.tree.leaves(grads)]).tolist()
    if jax.process_index() == 0:
        with open(output, "w") as file:
            json.dump(results, file)


def _host(array):
    return np.asarray(on_every_host(array))


if __name__ == "__main__":
    if len(sys.argv) > 4:  # process id, count, coordinator port
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{sys.argv[6]}", num_processes=int(sys.argv[5]),
                                   process_id=int(sys.argv[4]))
    main(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3])
