"""One GRPO iteration (rollouts + update), ours vs Hugging Face TRL's `GRPOTrainer`, on the CPU, in one process.

Same tiny random gpt-oss (the sizes of benchmarks/lora_step.py, float32), same prompts (token for token), same
group size, completion budget and LoRA (rank 8, alpha 16, on q/k/v/o), AdamW, beta = 0 and one inner step (no
reference or old-policy pass on either side). One iteration = sample `group_size` completions of every prompt,
score them (the completion's length in characters: a cheap reward, so the figure is the engine's), and one
optimizer step over all of them. A random model almost never samples a stop token, so both sides generate the
full budget. The first iteration (compiles, warm-up) is left out; medians of the rest. Rollout decode tokens/s is
reported for both. The process runs with `reuse_freed_memory()`'s malloc settings, as `gptoss-jax` does.

    python benchmarks/grpo_step.py                       # 2 prompts x 8 completions x 32 tokens
    python benchmarks/grpo_step.py --prompts 4 --max-completion-length 64

Ours: `gptoss_jax.generation.Generator` on the training parameters (a prompt prefilled once for its group),
`train.grpo.completion_batch` and one jitted `PolicySteps.update` (TRL's default loss: token-level, "dapo").

The peer, as fast as it goes on this CPU:
  * attention "eager": gpt-oss' attention sinks rule out sdpa, and flex attention with sinks needs a GPU.
  * experts: transformers' `experts_implementation`; on a CPU "eager" (a Python loop over the experts hit),
    "batched_mm" (gathers each token's experts' weights and runs one bmm) and "grouped_mm" (torch._grouped_mm over
    tokens sorted by expert; transformers' default) are usable. `trl_iteration_seconds` takes the one to use. At
    these sizes (2 cores, quiet machine) grouped_mm and eager tie within noise (~1.0-1.1 s per iteration of 2 x 8 x
    32 tokens; grouped_mm's decoding a little faster, eager's training step a little faster) and batched_mm is
    20-30x slower (it materialises every token's experts' weights), so the default is grouped_mm.
  * torch threads = all cores (override with `threads`). On a machine shared with other work, 2 threads on 2 cores
    suffer huge stalls (OpenMP threads spin-waiting for a descheduled sibling): per-step times of 5-70 s instead of
    1 s; 1 thread stays steady (~1.6 s) under the same load. Read `per_iteration` / `min_seconds_per_iteration`.
  * activation (gradient) checkpointing OFF: GRPOConfig turns it on by default (it recomputes the forward in the
    backward). transformers 5.24 renamed `gradient_checkpointing` to `activation_checkpointing`; we set the new name
    (setting the old one works but warns).
  * float32 throughout: bf16/fp16 off (GRPOConfig defaults bf16 to True).
  * router_aux_loss_coef = 0.0: TRL otherwise adds the model config's MoE load-balancing loss (gpt-oss: 0.001 x the
    Switch aux loss, requesting router logits from every layer), which is not part of GRPO's objective.
  * generation with `use_cache=True` (dynamic cache), `disable_compile` (TRL sets it), sampling at temperature 1.0,
    top_p 1.0, top_k 0 (no filtering).

The tiny checkpoint's tokenizer (`build_tokenizer`): the o200k_harmony tokenizer is not available in Hugging Face
format offline, so the checkpoint carries a small byte-level BPE of exactly `vocab_size` ids: the 256 bytes (GPT-2
style printable stand-ins), then two-character merges (letters, digits, space + letter) to fill the vocabulary, then
harmony's 8 special tokens at the top ids (<|start|>, <|end|>, <|message|>, <|channel|>, <|constrain|>,
<|return|>, <|call|>, <|endoftext|>). Every id the model can sample decodes to text. eos = <|return|> (and
<|call|> through the generation config, as harmony stops on either); pad = <|endoftext|>; no bos.

Tested with trl 1.16.0 (`pip install --no-deps trl datasets pandas dill multiprocess xxhash`, so that torch and
transformers stay as they are),
transformers 5.24.0, peft 0.21.2, accelerate 1.15.0, torch 2.13.0+cpu.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HARMONY_SPECIALS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>",
                    "<|endoftext|>"]
EOS, PAD, STOP_ALSO = "<|return|>", "<|endoftext|>", "<|call|>"

# The model sizes of benchmarks/lora_step.py.
SIZES = dict(num_hidden_layers=4, hidden_size=256, intermediate_size=256, head_dim=64, num_attention_heads=8,
             num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=4, vocab_size=4096, sliding_window=128)
DEFAULT_EXPERTS = "grouped_mm"


# --------------------------------------------------------------------------------------------- tiny checkpoint


def _byte_alphabet() -> list[str]:
    """A printable unicode character standing for each byte value 0..255 (the GPT-2 byte-level convention that
    `tokenizers`' ByteLevel pre-tokenizer and decoder use): printable Latin-1 bytes stand for themselves, the rest
    are moved to code points 256 upwards, in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    chars, moved = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + moved))
            moved += 1
    return chars


def build_tokenizer(vocab_size: int):
    """A `PreTrainedTokenizerFast` (byte-level BPE) with exactly `vocab_size` ids; see the module docstring."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = _byte_alphabet()
    n_merges = vocab_size - 256 - len(HARMONY_SPECIALS)
    if n_merges < 0:
        raise ValueError(f"vocab_size {vocab_size} is below 256 bytes + {len(HARMONY_SPECIALS)} special tokens")
    space = alphabet[ord(" ")]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    digits = [str(d) for d in range(10)]
    # Merge candidates, commonest-looking first: space+letter, letter pairs, then the rest of the pairs.
    candidates = [(space, b) for b in letters]
    candidates += [(a, b) for a in letters for b in letters]
    candidates += [(a, b) for a in letters + digits + [space] for b in digits + letters if (a, b) not in candidates]
    if n_merges > len(candidates):
        raise ValueError(f"vocab_size {vocab_size} needs more than {len(candidates)} merges; not supported")
    merges = candidates[:n_merges]
    vocab = {char: index for index, char in enumerate(alphabet)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in HARMONY_SPECIALS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=PAD)
    ids = tokenizer.convert_tokens_to_ids(HARMONY_SPECIALS)
    if len(tokenizer) != vocab_size or ids != list(range(vocab_size - len(HARMONY_SPECIALS), vocab_size)):
        raise AssertionError(f"tokenizer has {len(tokenizer)} ids, specials at {ids}; expected {vocab_size}")
    return tokenizer


def make_tiny_checkpoint(directory: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Save a random transformers gpt-oss (tests/hf_models.py's `random_hf_model`, the `SIZES` unless overridden)
    and `build_tokenizer`'s tokenizer to `directory`; the generation config stops on <|return|> and <|call|>."""
    tests = Path(__file__).resolve().parents[1] / "tests"
    if str(tests) not in sys.path:
        sys.path.insert(0, str(tests))
    from hf_models import random_hf_model

    directory = Path(directory)
    sizes = {**SIZES, **overrides}
    tokenizer = build_tokenizer(sizes["vocab_size"])
    model = random_hf_model(seed, **sizes)
    eos, stop_also, pad = tokenizer.convert_tokens_to_ids([EOS, STOP_ALSO, PAD])
    model.config.eos_token_id, model.config.pad_token_id, model.config.bos_token_id = eos, pad, None
    model.generation_config.eos_token_id = [eos, stop_also]
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = None
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------------------------- the benchmark


def length_reward(completions, **_):
    """Trivial, cheap reward: the completion's length in characters (TRL passes decoded completions)."""
    return [float(len(text)) for text in completions]


class _GenerateTimer:
    """Wraps a model's `generate` (as an instance attribute) to time each call and count the completion tokens
    that TRL keeps: up to and including the first stop token, all of `max_new_tokens` otherwise."""

    def __init__(self, model, stop_ids: list[int]):
        self.model, self.original, self.stop_ids = model, model.generate, torch.tensor(stop_ids)
        self.calls: list[dict] = []
        model.generate = self  # nn.Module.__setattr__ puts a plain callable in the instance dict

    def __call__(self, *args, **kwargs):
        prompt_length = (kwargs["input_ids"] if "input_ids" in kwargs else args[0]).shape[1]
        start = time.perf_counter()
        output = self.original(*args, **kwargs)
        seconds = time.perf_counter() - start
        completions = output[:, prompt_length:].cpu()
        width = completions.shape[1]
        is_stop = torch.isin(completions, self.stop_ids)
        lengths = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, torch.full_like(completions[:, 0], width))
        self.calls.append({"seconds": seconds, "tokens": int(lengths.sum()), "sequences": completions.shape[0],
                           "full_length": int((lengths == width).sum()), "width": width})
        return output

    def restore(self):
        del self.model.generate


def trl_iteration_seconds(model_dir: str, prompts: list[str], *, group_size: int, max_completion_length: int,
                          lora_rank: int, lora_targets: list[str], iterations: int = 4,
                          experts_implementation: str = DEFAULT_EXPERTS, learning_rate: float = 1e-5,
                          seed: int = 0, threads: int | None = None) -> dict:
    """Time `iterations` GRPO iterations of TRL's GRPOTrainer (one optimizer step each, over all prompts x
    group_size completions) on the CPU, LoRA on `lora_targets`. The first iteration is a warm-up; the result holds
    the medians over the others (over all, if there is only one):

        seconds_per_iteration           wall time of a trainer step (rollout + reward + forward/backward + AdamW)
        rollout_seconds                 time in `generate` (the sampling of all completions) per iteration
        update_seconds                  the rest: tokenising/decoding, reward, loss forward + backward, optimizer
        completion_tokens_per_iteration completion tokens kept by TRL (up to the first stop token)
        min_seconds_per_iteration       the fastest timed iteration (the shared 2-core machine has large spikes)
        full_length_fraction            completions that ran to max_completion_length (no stop token sampled)
        lora_trainable_parameters, lora_b_tensors_changed   a check that the adapters are what is trained
        per_iteration                   the raw numbers of every iteration, the warm-up included
        trl_version, transformers_version, torch_version, peft_version, settings
    """
    import peft
    import transformers
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, GptOssForCausalLM, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    torch.set_num_threads(threads or os.cpu_count())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = GptOssForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager",
                                              experts_implementation=experts_implementation)
    completions_per_step = len(prompts) * group_size
    settings = dict(
        max_steps=iterations, per_device_train_batch_size=completions_per_step, gradient_accumulation_steps=1,
        num_generations=group_size, max_completion_length=max_completion_length, temperature=1.0, top_p=1.0,
        top_k=0, beta=0.0, num_iterations=1, router_aux_loss_coef=0.0, use_vllm=False, learning_rate=learning_rate,
        use_cpu=True, bf16=False, fp16=False, activation_checkpointing=False, generation_kwargs={"use_cache": True},
        report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0, seed=seed)
    lora = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=list(lora_targets),
                      bias="none", task_type="CAUSAL_LM")

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.start)

    step_timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = GRPOTrainer(
            model=model, reward_funcs=length_reward, args=GRPOConfig(output_dir=output_dir, **settings),
            train_dataset=Dataset.from_dict({"prompt": list(prompts)}), processing_class=tokenizer,
            peft_config=lora, callbacks=[step_timer])
        trainer.remove_callback(PrinterCallback)  # the end-of-training summary line
        lora_b = {name: param.detach().clone() for name, param in trainer.model.named_parameters()
                  if "lora_B" in name}
        trainable = sum(param.numel() for param in trainer.model.parameters() if param.requires_grad)
        generate_timer = _GenerateTimer(trainer.model, trainer.eos_token_ids)
        try:
            trainer.train()
        finally:
            generate_timer.restore()
        trained = dict(trainer.model.named_parameters())
        lora_moved = sum(not torch.equal(trained[name].detach(), before) for name, before in lora_b.items())
        if not lora_b or lora_moved == 0:
            raise RuntimeError(f"LoRA did not train: {len(lora_b)} lora_B tensors, {lora_moved} changed")

    calls = generate_timer.calls
    if len(step_timer.seconds) != iterations or len(calls) != iterations:
        raise RuntimeError(f"expected {iterations} steps with one generate call each, got {len(step_timer.seconds)} "
                           f"steps and {len(calls)} generate calls")
    per_iteration = [{"seconds": step, "rollout_seconds": call["seconds"], "completion_tokens": call["tokens"],
                      "completions": call["sequences"], "full_length": call["full_length"]}
                     for step, call in zip(step_timer.seconds, calls, strict=True)]
    timed = per_iteration[1:] or per_iteration

    def median(key):
        return statistics.median(row[key] for row in timed)

    return {
        "seconds_per_iteration": median("seconds"),
        "rollout_seconds": median("rollout_seconds"),
        "update_seconds": statistics.median(row["seconds"] - row["rollout_seconds"] for row in timed),
        "min_seconds_per_iteration": min(row["seconds"] for row in timed),  # robust to a shared machine's spikes
        "completion_tokens_per_iteration": median("completion_tokens"),
        "completions_per_iteration": completions_per_step,
        "full_length_fraction": sum(row["full_length"] for row in timed) / sum(row["completions"] for row in timed),
        "per_iteration": per_iteration,
        "lora_trainable_parameters": trainable,
        "lora_b_tensors_changed": f"{lora_moved}/{len(lora_b)}",
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "peft_version": peft.__version__,
        "settings": {"attn_implementation": "eager", "experts_implementation": experts_implementation,
                     "dtype": "float32", "torch_threads": torch.get_num_threads(),
                     "loss_type": trainer.args.loss_type, "optimizer": str(trainer.args.optim),
                     "stop_token_ids": list(trainer.eos_token_ids),
                     "activation_checkpointing_resolved": bool(trainer.args.gradient_checkpointing),
                     **{k: v for k, v in settings.items() if k not in ("report_to",)}},
    }


# --------------------------------------------------------------------------------------------- ours


def ours_iteration_seconds(model_dir: str, prompts: list[list[int]], *, group_size: int, max_completion_length: int,
                           lora_rank: int, lora_targets: list[str], stop_ids: list[int], iterations: int = 4,
                           learning_rate: float = 1e-5) -> dict:
    """The same iteration with gptoss_jax: medians over the iterations after the first."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from transformers import AutoTokenizer

    import gptoss_jax
    from gptoss_jax import lora
    from gptoss_jax.generation import Generator
    from gptoss_jax.model import LoRAParam
    from gptoss_jax.train import grpo

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = gptoss_jax.load_model(model_dir, dtype="float32")
    lora.add_lora(model, lora.LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank, targets=tuple(lora_targets)),
                  rngs=nnx.Rngs(1))
    graphdef, master, frozen = nnx.split(model, LoRAParam, ...)
    dtypes = jax.tree.map(lambda a: a.dtype, master)
    transform = optax.adamw(learning_rate, weight_decay=0.0)
    opt_state = transform.init(master)
    steps = grpo.make_policy_steps(graphdef, dtypes, transform, grpo.LossSettings(normalisation="token"))
    generator = Generator(model)
    rows = [prompt for prompt in prompts for _ in range(group_size)]
    length = grpo.update_length(max(map(len, rows)), max_completion_length)
    per_iteration = []
    for iteration in range(iterations):
        started = time.perf_counter()
        generator.state = nnx.state(nnx.merge(graphdef, master, frozen))
        completions = generator.generate(rows, max_completion_length, temperature=1.0, stop_tokens=stop_ids,
                                         seed=[iteration * len(rows) + row for row in range(len(rows))])
        rolled = time.perf_counter()
        rewards = np.asarray([len(tokenizer.decode(c)) for c in completions], np.float32)
        advantages = grpo.group_advantages(jnp.asarray(rewards), group_size)
        batch = grpo.completion_batch(rows, completions, length)
        master, opt_state, metrics = steps.update(master, opt_state, frozen, batch, None, None, advantages)
        jax.block_until_ready((master, metrics))
        finished = time.perf_counter()
        per_iteration.append({"seconds": finished - started, "rollout_seconds": rolled - started,
                              "completion_tokens": sum(map(len, completions))})
    timed = per_iteration[1:] or per_iteration
    return {"seconds_per_iteration": statistics.median(r["seconds"] for r in timed),
            "rollout_seconds": statistics.median(r["rollout_seconds"] for r in timed),
            "update_seconds": statistics.median(r["seconds"] - r["rollout_seconds"] for r in timed),
            "min_seconds_per_iteration": min(r["seconds"] for r in timed),
            "completion_tokens_per_iteration": statistics.median(r["completion_tokens"] for r in timed),
            "per_iteration": per_iteration}


def example_prompts(count: int) -> list[str]:
    questions = ["What is 17 times 23?", "Name three prime numbers above fifty.", "Spell 'gradient' backwards.",
                 "Why is the sky blue? Answer in one sentence."]
    return [f"<|start|>system<|message|>You are a helpful assistant.<|end|><|start|>user<|message|>"
            f"{questions[i % len(questions)]}<|end|><|start|>assistant" for i in range(count)]


def main() -> None:
    import argparse
    import platform

    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=32)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--experts", default=DEFAULT_EXPERTS, help="the peer's experts: eager or grouped_mm")
    args = parser.parse_args()
    from gptoss_jax.allocator import reuse_freed_memory

    reuse_freed_memory()  # as `gptoss-jax` does, before jax and torch start their threads (both sides run under it)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    shared = dict(group_size=args.group_size, max_completion_length=args.max_completion_length,
                  lora_rank=args.lora_rank, lora_targets=targets, iterations=args.iterations)
    with tempfile.TemporaryDirectory() as directory:
        make_tiny_checkpoint(directory)
        texts = example_prompts(args.prompts)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        ids = [tokenizer(text)["input_ids"] for text in texts]
        stop_ids = tokenizer.convert_tokens_to_ids([EOS, STOP_ALSO])
        peer = trl_iteration_seconds(directory, texts, experts_implementation=args.experts, **shared)
        ours = ours_iteration_seconds(directory, ids, stop_ids=stop_ids, **shared)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; trl {peer['trl_version']}, "
          f"transformers {peer['transformers_version']}, torch {peer['torch_version']}, peft {peer['peft_version']}")
    print(f"{args.prompts} prompts x {args.group_size} completions x {args.max_completion_length} tokens, LoRA rank "
          f"{args.lora_rank} on q/k/v/o; medians of {args.iterations - 1} iterations after a warm-up")
    print("| | iteration | rollouts | update | rollout decode tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for name, r in ((f"TRL GRPOTrainer (experts {args.experts})", peer), ("gptoss-jax", ours)):
        print(f"| {name} | {r['seconds_per_iteration']:.3f} s | {r['rollout_seconds']:.3f} s | "
              f"{r['update_seconds']:.3f} s | {r['completion_tokens_per_iteration'] / r['rollout_seconds']:.0f} |")
    print(f"speed-up (TRL time / ours): iteration {peer['seconds_per_iteration'] / ours['seconds_per_iteration']:.2f}x,"
          f" rollouts {peer['rollout_seconds'] / ours['rollout_seconds']:.2f}x, update "
          f"{peer['update_seconds'] / ours['update_seconds']:.2f}x")


if __name__ == "__main__":
    main()
