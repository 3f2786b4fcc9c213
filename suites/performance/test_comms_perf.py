"""Performance of expert-parallel dispatch/combine on a local world (2 nodes x 2 ranks, gloo on the CPU; one rank
per GPU with NCCL under --dsv3-device cuda): for each implementation, the EP MoE is checked against the
single-process MoE, then dispatch (FP8) and combine (BF16) are timed, each after a barrier, beside a plain uniform
all-to-all of as many bytes; the records (throughput per rank with the model's predicted time, scale-out bytes
per token measured by the link counters beside the traffic model's count) go to --dsv3-results. The default test
run (--benchmark-disable) runs a small case once as a smoke test. Nothing here asserts a time.
Workloads: harness.bench.comms.
"""

from __future__ import annotations

import pytest

from harness.bench.comms import bench_case, run_ep

pytestmark = [pytest.mark.perf, pytest.mark.distributed]


@pytest.mark.parametrize("spec", ["reference", "hierarchical"])
def test_ep_dispatch_combine_throughput(benchmark, ep_world, dsv3_results, spec):
    smoke = benchmark.disabled
    case = bench_case(tokens=32 if smoke else 256, hidden=256 if smoke else 2048)
    if ep_world.world_size != case.world:
        pytest.skip(f"the benchmark case needs {case.world} ranks, the world has {ep_world.world_size}")
    run = benchmark.pedantic(run_ep, args=(ep_world.run, spec, case, 1 if smoke else 7), rounds=1, iterations=1)
    benchmark.extra_info.update(impl=spec, path=run.path, tokens_per_rank=case.tokens[0], hidden=case.hidden)
    assert run.error <= run.bound, f"EP MoE vs single-process: {run.rule} {run.error:.3g} > {run.bound:g}"
    assert run.bytes_match, "link byte counters differ from the traffic model's count"
    if not smoke:
        for record in run.records:
            dsv3_results.add(record)
