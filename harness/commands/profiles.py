"""`dsv3 profiles [NAME|PATH]`: the declared hardware profiles side by side, or one with every number's source
(`local` probes this machine)."""

from __future__ import annotations

import argparse

from tabulate import tabulate

from hardware.profile import NUMERIC_FIELDS, Profile, ProfileError, load_profile, profile_names
from harness.formatting import significant

HELP = "list the hardware profiles, or show one with its sources"
INPUT_ERRORS = (ProfileError,)
_LISTED = ("bf16_dense_TFLOPS", "fp8_dense_TFLOPS", "hbm_bandwidth_GBps", "scaleup_GBps_per_gpu",
           "scaleout_GBps_per_gpu")  # the columns of the list


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", metavar="NAME|PATH", help="a profile to show (`local` probes this machine)")


def _show_profile(p: Profile) -> None:
    """One profile: every number (4 significant digits, as in the list) beside its source, then the notes."""
    rows = [[f, significant(p.get(f)), p.sources.get(f, "")] for f in NUMERIC_FIELDS if p.get(f) is not None]
    print(f"{p.name}: {p.description} [{p.kind}]\n")
    print(tabulate(rows, headers=["field", "value", "source"], tablefmt="simple", disable_numparse=True,
                   colalign=("left", "right", "left")))
    if p.notes:
        print(f"\nnotes: {p.notes}")


def _list_profiles() -> None:
    """The declared profiles side by side, 4 significant digits."""
    rows = [[p.name, *(significant(p.get(f)) for f in _LISTED), p.description]
            for p in map(load_profile, profile_names())]
    print(tabulate(rows, headers=["profile", "BF16 TFLOP/s", "FP8 TFLOP/s", "mem GB/s", "scale-up GB/s",
                                  "scale-out GB/s", "description"], tablefmt="simple", disable_numparse=True,
                   colalign=("left", *("right",) * len(_LISTED), "left")))
    print("\nlocal: probed on demand (`dsv3 profiles local`); a user profile: `dsv3 profiles path/to/profile.toml`")


def run(args: argparse.Namespace) -> int:
    """`dsv3 profiles [NAME|PATH]`: list the declared profiles, or show one with every number's source."""
    if args.name:
        _show_profile(load_profile(args.name))
    else:
        _list_profiles()
    return 0
