"""Hardware profiles: the declared files validate, bad files name the file and field, the probe measures."""

from __future__ import annotations

import pytest

from hardware.profile import NUMERIC_FIELDS, ProfileError, load_profile, load_profile_file, profile_names
from hardware.roofline import achieved_fraction_of_bandwidth, roofline
from hardware.timing import Timing, paired_ratio, quartiles, round_ratios

DECLARED = ("b200", "gb200-nvl72", "h100", "h200", "h800", "mi300x", "rtx4090")

GOOD = """name = "x"
description = "a test device"
kind = "gpu"
bf16_dense_TFLOPS = { value = 100, source = "test" }
hbm_capacity_GB = { value = 10, source = "test" }
hbm_bandwidth_GBps = { value = 1000, source = "test" }
gpus_per_node = { value = 8, source = "test" }
"""


def test_declared_profiles_validate_and_cite_every_number():
    assert tuple(profile_names()) == DECLARED
    for name in DECLARED:
        p = load_profile(name)
        present = [f for f in NUMERIC_FIELDS if p.get(f) is not None]
        assert set(p.sources) == set(present), name
        assert all(p.sources[f].strip() for f in present)


def test_paper_bandwidths():
    assert load_profile("h800").scaleout_GBps_per_gpu == 50  # 400 Gb/s CX7 InfiniBand per GPU
    nvl = load_profile("gb200-nvl72")
    assert (nvl.scaleup_GBps_per_gpu, nvl.scaleup_domain_gpus) == (900, 72)


def test_user_profile_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(GOOD)
    p = load_profile(str(path))
    assert p.name == "x" and p.bf16_dense_TFLOPS == 100 and p.scaleout_GBps_per_gpu is None


@pytest.mark.parametrize(("text", "message"), [
    (GOOD.replace("bf16_dense_TFLOPS", "bf16_TFLOPS"), "field 'bf16_TFLOPS': unknown"),
    (GOOD.replace('hbm_bandwidth_GBps = { value = 1000, source = "test" }\n', ""),
     "field 'hbm_bandwidth_GBps': missing"),
    (GOOD.replace('value = 1000, source = "test"', 'value = -5, source = "test"'),
     "field 'hbm_bandwidth_GBps': expected a positive number"),
    (GOOD.replace('value = 1000, source = "test"', "value = 1000"), "field 'hbm_bandwidth_GBps': expected {"),
    (GOOD.replace('value = 8, source = "test"', 'value = 8, source = " "'),
     "field 'gpus_per_node': source must be a non-empty string"),
    (GOOD.replace('value = 8, source', 'value = 2.5, source'), "field 'gpus_per_node': expected a whole number"),
    (GOOD.replace('kind = "gpu"', 'kind = "tpu"'), "field 'kind': expected one of gpu, cpu"),
    (GOOD.replace('name = "x"\n', ""), "field 'name': missing"),
    (GOOD + "[broken", "malformed TOML"),
])
def test_malformed_profiles_name_file_and_field(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ProfileError, match=message) as err:
        load_profile_file(path)
    assert str(path) in str(err.value)


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ProfileError, match="unknown profile 'nope'; known: b200, gb200-nvl72, .*, local"):
        load_profile("nope")


def test_local_probe_measures_positive_figures():
    p = load_profile("local")
    assert p.hbm_bandwidth_GBps > 0 and p.bf16_dense_TFLOPS > 0 and p.fp32_dense_TFLOPS > 0
    assert p.sources["hbm_bandwidth_GBps"].startswith("measured")


def test_roofline_picks_the_binding_resource():
    h800 = load_profile("h800")
    # 1 GB moved in a 1 GFLOP kernel is memory bound: 1e9 / 3350e9 s vs 1e9 / 989.4e12 s.
    r = roofline(h800, flops=1e9, bytes_moved=1e9)
    assert r.bound == "memory" and r.time_s == pytest.approx(1 / 3350)
    assert achieved_fraction_of_bandwidth(h800, 3350e9, 2.0) == pytest.approx(0.5)


def test_paired_ratio_pairs_samples_of_the_same_round():
    assert paired_ratio(Timing((2.0, 4.0, 6.0)), Timing((1.0, 4.0, 2.0))) == 2.0  # ratios 2, 1, 3
    # a machine three times slower in the later rounds: per-round ratios stay exact, medians of each would not
    slow = Timing((1.0, 1.0, 3.0, 3.0, 3.0))
    fast = Timing((0.5, 0.5, 1.5, 1.5, 1.5))
    assert paired_ratio(slow, fast) == 2.0
    assert round_ratios(Timing((2.0, 4.0, 6.0)), Timing((1.0, 4.0, 2.0))) == [2.0, 1.0, 3.0]
    with pytest.raises(ValueError, match="same rounds"):
        paired_ratio(Timing((1.0,)), Timing((1.0, 2.0)))
    with pytest.raises(ValueError, match="same rounds"):
        round_ratios(Timing(()), Timing(()))


def test_quartiles_inclusive_and_single_value():
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 4.0)
    assert quartiles([3.0]) == (3.0, 3.0)
    assert Timing((1.0, 2.0, 3.0, 4.0, 5.0)).iqr == 2.0
    with pytest.raises(ValueError, match="at least one value"):
        quartiles([])
