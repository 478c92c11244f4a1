"""Fine-tuning (LoRA and full) from config files; installed as gptoss_jax.train."""
