"""What several subcommands share: argument types and the model loader."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from dsv3ref.config import ModelConfig


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum` (anything else is a usage error naming the bound, not a default)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    return parse


positive_int = int_at_least(1)  # counts such as --threads: 0 or negative is an error


def load_model(spec: str) -> ModelConfig:
    """A preset name or a path to a JSON/TOML config (ours or a Hugging Face config.json)."""
    if Path(spec).suffix in (".json", ".toml") or Path(spec).exists():
        return ModelConfig.load(spec)
    return ModelConfig.preset(spec)
