"""dsv3ref.comms.ep and the EP MoE: the two paths agree, bad setups fail on every rank, a dead or stalled rank
is a clear error (never a hang), two torchrun launches as node 0 and node 1 run the EP check over loopback, and
the NCCL path (world of one) on a GPU."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3ref.comms.ep import AllToAll, EPGroup, EPInputError, ep_group, payload_bytes
from dsv3ref.comms.ep_moe import EPMoE, node_limited
from dsv3ref.config import ModelConfig
from dsv3ref.moe import MoE
from harness.bench.comms import BAD_SETUPS, EPCase, bad_input_job, case_tokens, fault_job, raw_routing, transport_job
from harness.distributed import LocalWorld, WorldError, child_env, free_port
from harness.numerics import F64_IDENTITY_RTOL, max_rel_err

ROOT = Path(__file__).resolve().parents[1]
CASE = EPCase(2, (5, 0, 7, 3), 136, 8, 3, 2, 11, drop=0.2)  # 2 nodes x 2 ranks, a rank without tokens


@pytest.fixture(scope="module")
def world():
    with LocalWorld(4, timeout_s=20.0) as w:
        yield w


@pytest.mark.distributed
@pytest.mark.parametrize(("dtype", "fmt", "combine"), [("float64", "native", "native"), ("float32", "fp8", "bf16")])
def test_hierarchical_delivers_what_flat_delivers(world, dtype, fmt, combine):
    # Same tokens, same order, bit for bit (dispatch does no arithmetic); combine sums the same copies, the
    # hierarchical path partly at the forwarding GPU: float64 to rounding, BF16 rounded once more there.
    case = dataclasses.replace(CASE, dtype=dtype, dispatch_fmt=fmt, combine_fmt=combine)
    flat, hierarchical = (world.run(transport_job, name, case) for name in ("reference", "hierarchical"))
    for a, b in zip(flat, hierarchical, strict=True):
        for key in ("x", "scales", "topk_idx", "topk_weights", "src_rank", "src_token"):
            assert (a[key] is None and b[key] is None) or torch.equal(a[key], b[key]), key
        rtol = F64_IDENTITY_RTOL if dtype == "float64" else 2.0 ** -8
        assert max_rel_err(b["combined"], a["combined"]) <= rtol
    assert sum(r["dispatch_bytes"].scaleout_total for r in hierarchical) < sum(
        r["dispatch_bytes"].scaleout_total for r in flat)


@pytest.mark.distributed
@pytest.mark.parametrize("kind", BAD_SETUPS)
def test_bad_setup_raises_on_every_rank(world, kind):
    messages = world.run(bad_input_job, "reference", CASE, kind)
    expected = {"gpus_per_node": "gpus_per_node: expected a divisor of the world size 4, got 5",
                "node_limit": "node_limit: expected 1 <= M <= the number of nodes 2, got 3"}[kind]
    assert all(m is not None and expected in m for m in messages), messages


@pytest.mark.distributed
def test_a_dead_rank_fails_the_job_with_every_ranks_fate():
    with LocalWorld(4, timeout_s=2.0) as w:
        with pytest.raises(WorldError) as err:
            w.run(fault_job, "reference", CASE, "die")
        assert not w.running  # torn down: its process groups are unusable
    assert err.value.failures[1] == "died (exit code 3)"
    survivors = [err.value.failures[r] for r in (0, 2, 3)]
    assert all(f.startswith("dsv3ref.comms.ep.EPCommError: dispatch") for f in survivors), survivors


@pytest.mark.distributed
def test_a_stalled_rank_makes_the_others_time_out():
    with LocalWorld(4, timeout_s=2.0) as w, pytest.raises(WorldError) as err:
        w.run(fault_job, "reference", CASE, "stall", 3.0)
    timed_out = [f for r, f in err.value.failures.items() if r != 1 and "Timed out" in f]
    assert timed_out and all("EPCommError" in f for f in timed_out), err.value.failures


@pytest.mark.distributed
def test_two_torchrun_launches_as_node_0_and_node_1(tmp_path):
    # What running on two machines looks like, over loopback: each launch is one node (one rank each, to keep
    # the test to four torch imports: two agents and two ranks).
    port = free_port()
    launches = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
         str(node), "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "harness.bench.ep_worker",
         "--impl", "hierarchical", "--tokens", "8", "--hidden", "64", "--reps", "1", "--timeout", "60",
         "--out", str(tmp_path / "results.json")],
        cwd=ROOT, env={**child_env(), "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for node in (0, 1)]
    outputs = []
    for launch in launches:
        try:
            outputs.append(launch.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for other in launches:
                other.kill()
            pytest.fail("torchrun did not finish within 240 s")
    assert [launch.returncode for launch in launches] == [0, 0], outputs
    assert "hierarchical (hierarchical): ok" in outputs[0]
    assert '"ep_scaleout_bytes_per_token"' in (tmp_path / "results.json").read_text()


@pytest.mark.gpu
@pytest.mark.distributed
def test_nccl_world_of_one():
    case = EPCase(1, (9,), 136, 4, 2, 1, 3, dtype="bfloat16", dispatch_fmt="fp8", combine_fmt="bf16")
    with LocalWorld(1, backend="nccl") as w:
        for name in ("reference", "hierarchical"):
            (got,) = w.run(transport_job, name, case)
            assert got["src_token"].tolist() == [t for t in range(9) if (raw_routing(case, 0)[0][t] >= 0).any()]
            assert got["dispatch_bytes"].scaleout == [0] and got["dispatch_bytes"].scaleup == 0  # all local
            x = case_tokens(case, 0).float()
            hit = (raw_routing(case, 0)[0] >= 0).any(-1, keepdim=True)
            assert max_rel_err(got["combined"].float(), x * hit) < 0.07  # FP8: 3 mantissa bits


# --- without processes ---------------------------------------------------------------------------------------------
def test_node_limited_routing_config_and_its_bad_input():
    cfg = node_limited(ModelConfig.preset("dsv3-tiny"), 2, 1)
    assert (cfg.moe.n_group, cfg.moe.topk_group) == (2, 1)
    with pytest.raises(EPInputError, match="node_limit: expected 1 <= M <= the number of nodes 2, got 3"):
        node_limited(cfg, 2, 3)
    with pytest.raises(EPInputError, match="nodes: expected a divisor of n_routed_experts 8, got 3"):
        node_limited(cfg, 3, 1)


def test_ep_moe_needs_experts_divisible_by_the_ranks():
    ep = EPGroup(0, 3, 1, torch.device("cpu"), None, None)
    with pytest.raises(EPInputError, match=r"n_routed_experts: expected a multiple of the world size 3 \(experts"):
        EPMoE(MoE(ModelConfig.preset("dsv3-tiny"), backend="loop"), ep)


def test_payload_bytes_and_bad_arguments():
    assert payload_bytes(7168, torch.bfloat16, "fp8") == 7168 + 4 * 56  # e4m3 data + one fp32 scale per 128
    assert payload_bytes(136, torch.float32, "fp8") == 136 + 8  # a partial second tile has its own scale
    assert payload_bytes(7168, torch.float32, "bf16") == 14336
    assert payload_bytes(10, torch.float64, "native") == 80
    with pytest.raises(EPInputError, match="fmt: expected one of"):
        payload_bytes(10, torch.float64, "fp4")
    with pytest.raises(EPInputError, match="path: expected one of flat, hierarchical"):
        AllToAll("ring")
    with pytest.raises(EPInputError, match="not initialised"):
        ep_group(1)
