"""Hardware profiles: one TOML file per device, validated, with a source for every number.

Units are in the field names. Compute is dense (not 2:4 sparse); bandwidths are per GPU and per direction
(not bidirectional). A numeric field is written `name = { value = 3350, source = "..." }`.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any


class ProfileError(ValueError):
    """A malformed or unknown hardware profile; the message names the file and field."""


# Numeric fields: name -> (required, description). Optional ones may be absent (e.g. no scale-out network).
NUMERIC_FIELDS: dict[str, tuple[bool, str]] = {
    "bf16_dense_TFLOPS": (True, "dense BF16 matmul throughput, TFLOP/s"),
    "fp8_dense_TFLOPS": (False, "dense FP8 matmul throughput, TFLOP/s"),
    "fp32_dense_TFLOPS": (False, "dense FP32 matmul throughput, TFLOP/s"),
    "hbm_capacity_GB": (True, "device memory capacity, GB (10^9 B)"),
    "hbm_bandwidth_GBps": (True, "device memory bandwidth, GB/s"),
    "scaleup_GBps_per_gpu": (False, "scale-up (NVLink/Infinity Fabric) bandwidth per GPU per direction, GB/s"),
    "scaleup_domain_gpus": (False, "GPUs in one scale-up domain"),
    "scaleout_GBps_per_gpu": (False, "scale-out (NIC) bandwidth per GPU per direction, GB/s"),
    "gpus_per_node": (True, "GPUs per node (server or compute tray)"),
}
TEXT_FIELDS = ("name", "description", "kind", "notes")
KINDS = ("gpu", "cpu")


@dataclass(frozen=True)
class Profile:
    """A validated hardware profile. `sources[field]` says where each number comes from."""

    name: str
    description: str
    kind: str
    bf16_dense_TFLOPS: float
    hbm_capacity_GB: float
    hbm_bandwidth_GBps: float
    gpus_per_node: int
    fp8_dense_TFLOPS: float | None = None
    fp32_dense_TFLOPS: float | None = None
    scaleup_GBps_per_gpu: float | None = None
    scaleup_domain_gpus: int = 1
    scaleout_GBps_per_gpu: float | None = None
    notes: str = ""
    sources: dict[str, str] = field(default_factory=dict)
    path: str = ""

    def get(self, name: str) -> float | None:
        """A numeric field by name (None when the device has no such figure)."""
        if name not in NUMERIC_FIELDS:
            raise ProfileError(f"profile field {name!r}: unknown; expected one of {', '.join(NUMERIC_FIELDS)}")
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _numeric(where: str, key: str, entry: Any) -> tuple[float, str]:
    if not isinstance(entry, dict) or set(entry) != {"value", "source"}:
        raise ProfileError(f"{where}: field {key!r}: expected {{ value = <number>, source = \"...\" }}")
    value, source = entry["value"], entry["source"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ProfileError(f"{where}: field {key!r}: expected a positive number, got {value!r}")
    if not isinstance(source, str) or not source.strip():
        raise ProfileError(f"{where}: field {key!r}: source must be a non-empty string")
    if key in ("gpus_per_node", "scaleup_domain_gpus") and value != int(value):
        raise ProfileError(f"{where}: field {key!r}: expected a whole number, got {value!r}")
    return value, source


def profile_from_dict(data: dict[str, Any], where: str) -> Profile:
    """Validate a parsed profile table; `where` (a file name) prefixes every error."""
    unknown = sorted(set(data) - set(NUMERIC_FIELDS) - set(TEXT_FIELDS))
    if unknown:
        raise ProfileError(f"{where}: field {unknown[0]!r}: unknown; expected one of "
                           f"{', '.join([*TEXT_FIELDS, *NUMERIC_FIELDS])}")
    for key in ("name", "description", "kind"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise ProfileError(f"{where}: field {key!r}: missing or not a non-empty string")
    if data["kind"] not in KINDS:
        raise ProfileError(f"{where}: field 'kind': expected one of {', '.join(KINDS)}, got {data['kind']!r}")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, (required, _) in NUMERIC_FIELDS.items():
        if key not in data:
            if required:
                raise ProfileError(f"{where}: field {key!r}: missing ({NUMERIC_FIELDS[key][1]})")
            continue
        value, sources[key] = _numeric(where, key, data[key])
        values[key] = int(value) if key in ("gpus_per_node", "scaleup_domain_gpus") else float(value)
    text = {k: data[k] for k in TEXT_FIELDS if k in data}
    return Profile(**text, **values, sources=sources, path=where)


def load_profile_file(path: str | Path) -> Profile:
    """Load and validate a profile TOML file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))  # TOML is UTF-8 by specification
    except OSError as e:
        raise ProfileError(f"{path}: cannot read profile ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ProfileError(f"{path}: cannot read profile (not UTF-8 text: byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: malformed TOML ({e})") from None
    return profile_from_dict(data, str(path))


def profile_names() -> list[str]:
    """Names of the declared (shipped) profiles; `local` is probed, not declared."""
    files = resources.files("hardware.profiles").iterdir()
    return sorted(f.name.removesuffix(".toml") for f in files if f.name.endswith(".toml"))


def load_profile(name_or_path: str) -> Profile:
    """A declared profile by name, `local` (probed now), or a user's TOML file by path."""
    if name_or_path == "local":
        from hardware.probe import probe_local

        return probe_local()
    if name_or_path in profile_names():
        res = resources.files("hardware.profiles").joinpath(f"{name_or_path}.toml")
        with resources.as_file(res) as p:
            return load_profile_file(p)
    if name_or_path.endswith(".toml") or Path(name_or_path).exists():
        return load_profile_file(name_or_path)
    raise ProfileError(f"unknown profile {name_or_path!r}; known: {', '.join([*profile_names(), 'local'])} "
                       "(or a path to a .toml profile)")
