"""Section (full): Multi-Token Prediction measured on a model trained here with the MTP loss: second-token
acceptance of speculative decoding, accepted length, tokens per forward, tokens/s with and without speculation
(side by side) beside the ideal 1 + p and the paper's 1.8x at 80-90%; acceptance against training steps; the
training's loss curve. Workloads: harness.bench.mtp (the trained run is cached: one report trains once).
"""

from __future__ import annotations

import torch

from dsv3ref.config import ModelConfig
from dsv3ref.generate import Sampling
from dsv3ref.mtp_train import History
from harness import paper
from harness.bench import mtp as bench
from harness.bench.common import dtype_name
from harness.formatting import num, ratio_cell
from harness.report_sections import ReportContext, Table, section
from harness.results import Record

SAMPLED = Sampling(temperature=1.0, seed=0)
LOSS_WINDOW = 10


@section("mtp", "Multi-Token Prediction: acceptance and speculative decoding speed", order=69, quick=False)
def run(ctx: ReportContext) -> list[Table]:
    tables = []
    for cfg in ctx.measured_models(bench.fits_here, ModelConfig.preset(bench.MODEL)):
        ctx.progress(f"mtp: training {cfg.name} with the MTP loss ({bench.PLAN.steps} steps; cached in "
                     f"{bench.run_dir(cfg)}) ...")
        out, history = bench.trained(cfg, ctx.device, lambda step, h: _every(ctx, step, h))
        ctx.progress(f"mtp: {cfg.name} acceptance at steps {', '.join(map(str, bench.ACCEPT_STEPS))} ...")
        curve, text = [], []
        for step in bench.ACCEPT_STEPS:
            model, mtp = bench.load_step(out, step, ctx.device)
            curve.append([bench.acceptance(model, mtp, step, s) for s in (Sampling(), SAMPLED)])
            text.append(bench.text_acceptance(model, mtp))
        ctx.progress(f"mtp: {cfg.name} generation with and without speculation, side by side ...")
        _, _, speed = bench.speedup(model, mtp, bench.PLAN.steps, ctx.device)
        tables += [_summary_table(ctx, cfg, curve[-1], speed, model),
                   _steps_table(ctx, cfg, curve, text, history)]
    return tables


def _every(ctx: ReportContext, step: int, h: History) -> None:
    """Training progress in the report's log, at every checkpoint."""
    if step % bench.CHECKPOINT_EVERY == 0:
        ctx.progress(f"mtp: step {step}/{bench.PLAN.steps}, loss {h.total[-1]:.3f} (main {h.main[-1]:.3f})")


def _summary_table(ctx: ReportContext, cfg: ModelConfig, last: list[bench.Acceptance], speed: Record,
                   model: torch.nn.Module) -> Table:
    rate_ref, speed_ref = paper.ref("mtp_acceptance_rate", bench.V3), paper.ref("mtp_speedup", bench.V3)
    records = [bench.acceptance_record(a, ctx.device) for a in last] + [speed]
    rows = []
    for a, r in zip(last, records, strict=False):
        rows.append([r.extra["sampling"], f"{r.value:.1%}", num(a.mean_accepted_length, 2),
                     num(a.gen.tokens_per_forward, 2), num(1 + r.value, 2), "—", "—", "—"])
    e = speed.extra
    rows.append(["greedy, batch 1 (timed)", f"{e['acceptance_rate']:.1%}", "—", num(e["tokens_per_forward"], 2),
                 num(1 + e["acceptance_rate"], 2), num(e["tokens_per_s_plain"], 1),
                 num(e["tokens_per_s_speculative"], 1), ratio_cell(speed)])
    rows.append([f"paper ({bench.V3})", "80-90%", "—", "—", "1.80-1.90", "—", "—", f"{speed_ref.value:.2f}x"])
    load = [r.extra["loadavg_1min"] for r in records]
    notes = [f"{cfg.name} trained here {bench.PLAN.steps} steps (batch {bench.PLAN.batch_size} x "
             f"{bench.PLAN.seq_len} bytes of the standard-library corpus, main + 0.3 x MTP loss, fp32; `dsv3 train`); "
             f"{dtype_name(model.embed.weight.dtype)} on {ctx.device} ({ctx.local.description}), "
             f"{torch.get_num_threads()} threads, load average {min(load):.2f}-{max(load):.2f}",
             f"acceptance: speculative decoding with the MTP module drafting the token after next (one draft per "
             f"step), {bench.NEW_TOKENS} bytes from each of {bench.PROMPTS} validation prompts of {bench.PROMPT_LEN} "
             "bytes; rate = accepted / drafted (vLLM's convention); accepted length = tokens emitted per verify "
             "step (the corrected or bonus token included); tokens/forward = emitted tokens per main-model forward "
             "(prefill included); sampled: temperature 1, the rejection rule (accepts with min(1, p/q))",
             f"ideal 1 + p: tokens per verify step if a draft costs nothing; tok/s: {bench.SPEED_NEW_TOKENS} greedy "
             "bytes of one prompt, plain `generate` vs `speculative_generate` timed side by side (interleaved "
             "rounds), speedup = plain / speculative time, median over rounds (inter-quartile range)",
             f"why the speedup is below 1 + p here: the drafter is one more block with a MoE FFN; the main model has "
             f"{cfg.num_layers} layers ({cfg.num_dense_layers} dense), so a draft costs about as much as the main "
             "model's MoE layer and a speculative step (draft + a 2-token verify) about 1.7-2x a plain step on a "
             "CPU where a step of a tiny model is per-operator dispatch, not weight reads; in DeepSeek-V3 the "
             "drafter is 1 layer beside 61 and a 2-token verify reads the same weights as a 1-token step",
             f"paper: {rate_ref.source}; {speed_ref.source}; ideal 1 + p at 80-90% is 1.8-1.9"]
    headers = ["sampling", "acceptance", "accepted length", "tokens/forward", "ideal 1 + p", "tok/s plain",
               "tok/s speculative", "speedup"]
    return Table(f"MTP speculative decoding on {cfg.name} (trained here)", headers, rows, records, notes)


def _steps_table(ctx: ReportContext, cfg: ModelConfig, curve: list[list[bench.Acceptance]],
                 text: list[tuple[float, float]], history: History) -> Table:
    val = dict(history.val)
    rows, records = [], []
    for (greedy, sampled), (text_greedy, text_sampled) in zip(curve, text, strict=True):
        step = greedy.steps_trained
        lo = max(0, step - LOSS_WINDOW)
        main = sum(history.main[lo:step]) / (step - lo)
        mtp1 = sum(d[0] for d in history.depths[lo:step]) / (step - lo)
        rows.append([step, num(main, 3), num(mtp1, 3), num(val[step], 3) if step in val else "—",
                     f"{greedy.gen.acceptance_rate:.1%}", f"{sampled.gen.acceptance_rate:.1%}",
                     num(greedy.mean_accepted_length, 2), f"{text_greedy:.1%}", f"{text_sampled:.1%}"])
        if step != curve[-1][0].steps_trained:  # the last step's records are the summary table's
            records += [bench.acceptance_record(a, ctx.device) for a in (greedy, sampled)]
    notes = [f"training loss: mean over the {LOSS_WINDOW} steps up to that step (main next-token loss, and the MTP "
             "module's L_1 normalised by T as in the paper); val loss: the total (main + 0.3 L_1) on fixed windows "
             "of the validation split",
             "acceptance measured from the checkpoint written at that step (same prompts, greedy and temperature 1): "
             "on the model's own output, which an under-trained byte model fills with repeats (easy to draft)",
             "on validation text: at every position of 8 validation windows of 128 bytes, whether the "
             "MTP draft of the token after next equals the main model's greedy choice one position later (greedy), "
             "and the rejection rule's acceptance probability sum_v min(p, q) at temperature 1 (sampled)"]
    headers = ["steps", "main loss", "MTP loss L_1", "val loss", "acceptance greedy", "acceptance sampled",
               "accepted length", "on text greedy", "on text sampled"]
    return Table(f"MTP acceptance against training steps ({cfg.name})", headers, rows, records, notes)
