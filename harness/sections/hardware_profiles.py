"""Section: the local machine (probed now) and the declared hardware profiles."""

from __future__ import annotations

from harness.formatting import significant
from harness.report_sections import ReportContext, Table, section
from harness.results import Record

# (field, header); values to 4 significant digits, so that a CPU's 0.0192 TFLOP/s does not print as 0.0
_COLUMNS = (("bf16_dense_TFLOPS", "BF16 TFLOP/s"), ("fp8_dense_TFLOPS", "FP8 TFLOP/s"), ("hbm_capacity_GB", "mem GB"),
            ("hbm_bandwidth_GBps", "mem GB/s"), ("scaleup_GBps_per_gpu", "scale-up GB/s/dir"),
            ("scaleout_GBps_per_gpu", "scale-out GB/s/dir"))
_UNITS = {"bf16_dense_TFLOPS": "TFLOP/s", "fp32_dense_TFLOPS": "TFLOP/s", "hbm_bandwidth_GBps": "GB/s"}
_DECLARED = {**_UNITS, "fp8_dense_TFLOPS": "TFLOP/s"}  # recorded for declared profiles (the roofline figure)


@section("hardware", "Hardware profiles", order=0)
def run(ctx: ReportContext) -> list[Table]:
    rows = []
    for p in ctx.profiles:
        cells = [significant(p.get(field)) for field, _ in _COLUMNS]
        rows.append([p.name, p.kind, *cells, p.scaleup_domain_gpus, p.gpus_per_node])
    records = [Record(metric=f, subject="local", profile="local", kind="measured", value=ctx.local.get(f),
                      unit=u, method="probe", extra={"source": ctx.local.sources[f]}) for f, u in _UNITS.items()]
    records += [Record(metric=f, subject=p.name, profile=p.name, value=p.get(f), unit=u, method="declared",
                       extra={"source": p.sources.get(f, "")})
                for p in ctx.profiles if p is not ctx.local for f, u in _DECLARED.items() if p.get(f) is not None]
    notes = [f"local: {ctx.local.description}; memory bandwidth, BF16 and FP32 matmul measured now "
             f"(FP32 {significant(ctx.local.fp32_dense_TFLOPS)} TFLOP/s)",
             "declared profiles: dense compute, bandwidth per GPU per direction; `dsv3 profiles NAME` "
             "lists each number's source"]
    headers = ["profile", "kind", *(h for _, h in _COLUMNS), "scale-up domain", "GPUs/node"]
    return [Table("Hardware profiles", headers, rows, records, notes)]
