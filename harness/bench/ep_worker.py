"""The expert-parallel check and benchmark as a per-rank program for torchrun, on one machine or several:

    torchrun --nnodes 2 --nproc-per-node 8 --node-rank 0 --master-addr HOST0 --master-port 29500 \\
        -m harness.bench.ep_worker [--tokens 256 --hidden 7168 --dispatch fp8 --combine bf16 ...]

(the same on every machine with its own --node-rank; or `--rdzv-backend c10d --rdzv-endpoint HOST0:29500` to let
torchrun assign node ranks). Ranks per node = torchrun's LOCAL_WORLD_SIZE; NCCL when a GPU is visible, else gloo.
For each implementation, every rank runs the EP MoE against the single-process reference on its own tokens and
times dispatch/combine; rank 0 prints one line per implementation and appends the records to --out.
Exit 0 when every check passes, 1 when one fails, 2 on bad arguments or input (one line on stderr).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist

from dsv3ref.comms.ep import DISPATCH_FORMATS, backend_for
from dsv3ref.config import ConfigError
from harness.bench.comms import DTYPES, EPCase, gathered, run_ep
from harness.environment import environment
from harness.registry import UsageError
from harness.results import append_records


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ep_worker", description=__doc__.splitlines()[0])
    p.add_argument("--impl", action="append", default=[], metavar="NAME|module:factory",
                   help="ep implementation (repeatable); default: reference and hierarchical")
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=0, help="routed experts (default: 4 per rank)")
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--node-limit", type=int, default=0, help="nodes per token, M (default: half the nodes)")
    p.add_argument("--inter", type=int, default=64, help="expert width")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--dispatch", choices=DISPATCH_FORMATS, default="fp8")
    p.add_argument("--combine", choices=("native", "bf16"), default="bf16")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0, help="collective timeout, seconds")
    p.add_argument("--out", default=None, metavar="FILE", help="append the records to this results document")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group(backend_for(device), timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    nodes = world // gpus if world % gpus == 0 else 1
    case = EPCase(gpus, (args.tokens,) * world, args.hidden, args.experts or 4 * world, args.topk,
                  args.node_limit or max(1, nodes // 2), args.seed, args.dtype, args.dispatch, args.combine,
                  inter=args.inter)
    try:
        runs = [run_ep(gathered, spec, case, args.reps) for spec in args.impl or ["reference", "hierarchical"]]
    except (ValueError, UsageError, ConfigError) as e:
        print(f"ep_worker: error: rank {rank}: {e}", file=sys.stderr)
        dist.destroy_process_group()
        return 2
    if rank == 0:
        for run in runs:
            scaleout, dispatch, combine = run.records
            print(f"{run.spec} ({run.path}): {'ok' if run.ok else 'FAILED'}: EP MoE vs single-process "
                  f"{run.rule} {run.error:.3g} (bound {run.bound:g}); scale-out {scaleout.value:.1f} B/token "
                  f"(model {scaleout.extra['analytic']:.1f}); dispatch {dispatch.value:.3g} GB/s/rank, combine "
                  f"{combine.value:.3g} GB/s/rank ({world} ranks, {gpus} per node, {device})", flush=True)
        if args.out:
            append_records(args.out, [r for run in runs for r in run.records], environment(device))
    ok = all(run.ok for run in runs)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
