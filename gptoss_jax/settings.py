"""Config files, overrides and the one `ConfigError`: what training runs, eval sweeps and the model's own config
share, below all of them.

A config file is a python file whose `get_config()` returns an ml_collections ConfigDict; `--config.a.b=value`
overrides any field, parsed as the type the field has. Unknown keys and values that cannot run are errors that
name the key (and the nearest valid one).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from pathlib import Path

import ml_collections


class ConfigError(ValueError):
    """A config file, key or value that cannot run — a training run's, a sweep's or a model's; the message names
    it."""


def read_config(path: str | os.PathLike, overrides: list[str] = (), *,
                reference: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """Runs the file's `get_config()` and applies `--config.a.b=value` overrides (any kind of config). With a
    `reference` (that kind's defaults), a key the file sets that the reference lacks — a typo such as
    `c.train.stpes` — is an error naming the nearest valid key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    spec = importlib.util.spec_from_file_location(f"_gptoss_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # the file is user code: report any failure with its name
        raise ConfigError(f"{path}: {type(error).__name__}: {error}") from error
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config()")
    config = module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    unknown = [] if reference is None else _unknown_keys(config, reference)
    if unknown:
        raise ConfigError(f"{path}: " + "; ".join(unknown))
    config.lock()
    apply_overrides(config, overrides)
    return config


def _unknown_keys(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict,
                  prefix: str = "") -> list[str]:
    """A line for each key of `config` that `reference` lacks, with the nearest valid key."""
    unknown = []
    for name, value in config.items():
        key = f"{prefix}{name}"
        if name not in reference:
            near = difflib.get_close_matches(name, list(reference.keys()), n=1)
            hint = f"did you mean config.{prefix}{near[0]}?" if near else f"valid keys: {sorted(reference.keys())}"
            unknown.append(f"config.{key} is not a setting ({hint})")
        elif isinstance(value, ml_collections.ConfigDict) and isinstance(reference[name], ml_collections.ConfigDict):
            unknown += _unknown_keys(value, reference[name], f"{key}.")
    return unknown


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """`--config.a.b=value` (or `a.b=value`): the value is parsed as the type the field already has."""
    for override in overrides:
        key, separator, text = override.removeprefix("--").removeprefix("config.").partition("=")
        if not separator:
            raise ConfigError(f"{override}: expected --config.KEY=VALUE")
        parent, name = _parent(config, key)
        current = parent[name]
        try:
            parent[name] = _parse(text, current)
        except (ValueError, SyntaxError) as error:
            raise ConfigError(f"config.{key}: {error}") from None


def _parent(config: ml_collections.ConfigDict, key: str):
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(parts[:depth]) or "(top level)"
            valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise ConfigError(f"config.{key}: unknown key {part!r} under {where}; valid keys: {valid}")
        if depth == len(parts) - 1:
            return node, part
        node = node[part]


def _parse(text: str, current):
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, tuple | list):
        value = ast.literal_eval(text) if text.strip().startswith(("(", "[")) else text.split(",")
        return type(current)(item.strip() if isinstance(item, str) else item for item in value)
    if isinstance(current, ml_collections.ConfigDict):
        raise ValueError("is a group of settings; override its fields")
    return text


def setting(config: ml_collections.ConfigDict, key: str):
    """The value at a dotted key, e.g. "model.remat"."""
    node = config
    for part in key.split("."):
        node = node[part]
    return node
