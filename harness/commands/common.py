"""What several subcommands share: argument types and the model loader."""

from __future__ import annotations

import argparse
from pathlib import Path

from dsv3ref.config import ModelConfig


def positive_int(text: str) -> int:
    """argparse type for counts such as --threads: an integer >= 1 (0 or negative is a usage error, not a default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def load_model(spec: str) -> ModelConfig:
    """A preset name or a path to a JSON/TOML config (ours or a Hugging Face config.json)."""
    if Path(spec).suffix in (".json", ".toml") or Path(spec).exists():
        return ModelConfig.load(spec)
    return ModelConfig.preset(spec)
