"""The tiny demo (configs/train/tiny_demo.py) trained for an MXFP4 export: quantization-aware (train.qat), its
merged experts written in MXFP4, into runs/tiny_demo_qat. `python benchmarks/qat_demo.py` trains it beside the plain
demo and sweeps both exports; README, "Fine-tuned and still MXFP4".
"""

from gptoss_jax.train.config import defaults


def get_config():
    config = defaults()
    config.train.qat = True
    config.export.mxfp4 = True
    config.train.output_dir = "runs/tiny_demo_qat"
    return config
