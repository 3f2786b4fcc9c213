"""Baselines: the architectures the paper compares DeepSeek-V3 against (MHA/GQA/MQA attention, dense FFN)."""
