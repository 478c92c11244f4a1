"""gptoss-jax: gpt-oss in JAX — a Flax model that loads the released checkpoints, for research and fine-tuning."""

from gptoss_jax.checkpoint import load_model
from gptoss_jax.config import ConfigError, GptOssConfig
from gptoss_jax.model import GptOss, parameter_counts
from gptoss_jax.tensor_files import CheckpointError

__all__ = ["CheckpointError", "ConfigError", "GptOss", "GptOssConfig", "load_model", "parameter_counts"]
__version__ = "0.1.0"
