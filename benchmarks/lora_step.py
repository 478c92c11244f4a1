"""LoRA train-step time, ours vs transformers + PEFT, on the CPU, in one process.

Same small random gpt-oss (float32), same tokens, same adapters (rank 8 on q/k/v/o and on every expert's
gate_up and down projections), AdamW. A step is forward + backward + optimizer update. The peer runs with each of
transformers' CPU experts implementations, "eager" (a loop over experts) and "grouped_mm" (the default, torch's
grouped matmul), attention "eager" (its sinks rule out sdpa, and flex attention with sinks needs a GPU); the
faster is the reference. We also time a large float32 matmul in the same run and report the step's achieved FLOP
rate as a fraction of that ceiling. Step FLOPs are counted from the model: forward 2 x active parameters x tokens,
backward the same again for the activation gradients (the frozen base needs no weight gradients; the adapters'
are negligible), plus causal attention scores and their gradients (banded layers: the window). Our step is also
timed with quantization-aware training (train.qat: the experts through Q(W + delta), what an MXFP4 export holds),
and its cost printed as a ratio to the plain step.

    python benchmarks/lora_step.py                 # batch 2 x 512 tokens
    python benchmarks/lora_step.py --length 2048 --batch 1
"""

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import timing  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

import gptoss_jax  # noqa: E402
from gptoss_jax.model import LoRAParam  # noqa: E402
from gptoss_jax.train import trainer  # noqa: E402
from gptoss_jax.train.config import load_config  # noqa: E402

from hf_models import random_hf_model  # noqa: E402

SIZES = dict(num_hidden_layers=4, hidden_size=256, intermediate_size=256, head_dim=64, num_attention_heads=8,
             num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=4, vocab_size=4096, sliding_window=128)
STEPS = 8
PEER_EXPERTS = ("eager", "grouped_mm")


def matmul_rate() -> float:
    a = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    seconds = timing.seconds(lambda: f(a).block_until_ready(), 10)
    return 2 * 2048**3 / seconds


def ours(directory: Path, tokens: np.ndarray, qat: bool = False):
    batch_size, length = tokens.shape[0], tokens.shape[1] - 1
    config = load_config(ROOT / "configs" / "train" / "tiny_demo.py", [
        f"--config.model.checkpoint={directory}", "--config.lora.enabled=true", "--config.model.mxfp4=packed",
        "--config.lora.targets=q_proj,k_proj,v_proj,o_proj,gate_up_proj,down_proj", "--config.optimizer.warmup_steps=1",
        f"--config.data.batch_size={batch_size}", f"--config.data.seq_len={length}", "--config.data.eval=",
        f"--config.train.qat={qat}", f"--config.export.mxfp4={qat}"])
    mesh = trainer.make_mesh(config)
    model = trainer.build_model(config, mesh)
    graphdef, params, frozen = nnx.split(model, LoRAParam, ...)
    dtypes = jax.tree.map(lambda a: a.dtype, params)
    transform, schedule = trainer.make_optimizer(config, params)
    state = {"master": params, "opt": transform.init(params)}
    steps = trainer.make_steps(config, graphdef, dtypes, transform, schedule)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones(tokens[:, 1:].shape, np.float32),
             "segment_ids": np.ones(tokens[:, 1:].shape, np.int32),
             "positions": np.broadcast_to(np.arange(length), (batch_size, length)).astype(np.int32)}

    def step():
        state["master"], state["opt"], metrics = steps.train(state["master"], state["opt"], frozen, batch,
                                                               jnp.int32(0))
        metrics["loss"].block_until_ready()

    return timing.seconds(step, STEPS, timing.median), step_flops(model.config, batch_size, length)


def step_flops(config, batch_size: int, length: int) -> float:
    _, active = gptoss_jax.parameter_counts(config)
    tokens = batch_size * length
    seen = [(min(length, config.sliding_window) if layer % 2 == 0 else length / 2)
            for layer in range(config.num_hidden_layers)]  # keys a query sees on average (banded, full layers)
    attention = 4 * config.num_attention_heads * config.head_dim * tokens * sum(seen)
    return 2 * (2 * active * tokens + attention)


def theirs(experts: str, tokens: np.ndarray):
    model = random_hf_model(seed=0, **SIZES)
    model.set_experts_implementation(experts)
    peft_model = get_peft_model(model, LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-3)
    inputs = torch.tensor(tokens, dtype=torch.long)  # transformers shifts the labels itself

    def step():
        loss = peft_model(inputs, labels=inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    peft_model.train()
    return timing.seconds(step, STEPS, timing.median)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    tokens = np.random.default_rng(0).integers(0, SIZES["vocab_size"], (args.batch, args.length + 1)).astype(np.int32)
    with tempfile.TemporaryDirectory() as directory:
        random_hf_model(seed=0, **SIZES).save_pretrained(directory)
        our_seconds, flops = ours(Path(directory), tokens)
        qat_seconds, _ = ours(Path(directory), tokens, qat=True)
    peer = {experts: theirs(experts, tokens) for experts in PEER_EXPERTS}
    rate = matmul_rate()
    best = min(peer, key=peer.get)
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}, "
          f"torch {torch.__version__}; model {SIZES}; batch {args.batch} x {args.length} tokens; float32")
    for experts, seconds in peer.items():
        print(f"transformers + PEFT LoRA step, experts={experts:10s} attention=eager: {seconds * 1e3:8.1f} ms")
    print(f"gptoss-jax LoRA step:                                          {our_seconds * 1e3:8.1f} ms   "
          f"speed-up {peer[best] / our_seconds:.2f}x over the faster peer ({best})")
    print(f"gptoss-jax LoRA step with QAT (train.qat):                     {qat_seconds * 1e3:8.1f} ms   "
          f"{qat_seconds / our_seconds:.2f}x our plain step")
    print(f"float32 matmul ceiling (2048^3, same run): {rate / 1e9:.1f} GFLOP/s")
    print(f"our step: {flops / 1e9:.2f} GFLOP (model count) -> {flops / our_seconds / 1e9:.1f} GFLOP/s = "
          f"{flops / our_seconds / rate:.0%} of the matmul ceiling")


if __name__ == "__main__":
    main()
