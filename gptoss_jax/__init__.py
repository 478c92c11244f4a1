"""gptoss-jax: gpt-oss in JAX — a Flax model that loads the released checkpoints, for research and fine-tuning."""

from gptoss_jax.checkpoint import convert, load_model, save_pretrained
from gptoss_jax.config import ConfigError, GptOssConfig
from gptoss_jax.generation import generate
from gptoss_jax.model import GptOss, parameter_counts
from gptoss_jax.mxfp4 import Mxfp4Weight
from gptoss_jax.tensor_files import CheckpointError

__all__ = [
    "CheckpointError",
    "ConfigError",
    "GptOss",
    "GptOssConfig",
    "Mxfp4Weight",
    "convert",
    "generate",
    "load_model",
    "parameter_counts",
    "save_pretrained",
]
__version__ = "0.1.0"
