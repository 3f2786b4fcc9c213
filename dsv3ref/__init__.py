"""dsv3ref: a clean reference implementation of DeepSeek-V3's hardware-aware components."""

from dsv3ref.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig, RopeConfig, preset_names

__all__ = ["AttentionConfig", "ConfigError", "ModelConfig", "MoEConfig", "RopeConfig", "preset_names"]
