"""Evaluation harness (reasoning-effort sweeps); installed as gptoss_jax.eval."""
