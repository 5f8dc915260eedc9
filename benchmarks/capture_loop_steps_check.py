"""Why a close-the-loop run missed: the calibrated step model on the real server's own steps.

    .venv/bin/python benchmarks/capture_loop_steps_check.py _s2 _s2_val0.7 _s2_val0.7_rep

For each `benchmarks/results/capture_loop<TAG>/` left by capture_close_loop.py: the
profile that `twin calibrate` fitted on the calibration steps predicts every step the
plugin captured, on the calibration phase and on the validation phase (same server, a
few minutes later). Predicted / measured total step time near 1.00 on both phases means
the step model transfers; a validation ratio well under 1.00 means the real server's
steps got slower between the phases (on this shared 2-core VM: other tenants), which no
calibration made before can predict. Also compares the real validation steps with the
twin's own run of the validation trace (batch size, queue, step time).

Writes benchmarks/results/capture_loop_steps_check.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tracekit import schema  # noqa: E402
from twin.api import ServingConfig, simulate  # noqa: E402
from twin.calibrate import load_steps  # noqa: E402
from twin.profile import load_profile  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
COLS = ("prefill_tokens", "decode_tokens", "context_tokens", "num_adapters", "rank_sum")


def check(tag: str) -> dict[str, float | str]:
    work = RESULTS / f"capture_loop{tag}"
    prof = load_profile(work / "profile.json")
    ctx = prof.data.get("captured_server_config", {})
    kw = {"max_lora_rank": int(ctx.get("max_lora_rank", 16)), "max_loras": int(ctx.get("max_loras", 2))}
    every, _ = load_steps([str(work / "steps")])
    cal, _ = load_steps([str(work / "calibration_steps")])
    val = every[cal.height:]  # the plugin's parts are in time order: calibration first

    def ratio(s: pl.DataFrame) -> float:
        s = s.fill_null(0)
        pred = prof.step_time(*[s[c].to_numpy().astype(np.float64) for c in COLS], **kw)
        pred = pred + prof.adapter_load_s(16, kw["max_lora_rank"]) * s["adapter_loads"].to_numpy()
        return float(pred.sum() / s["duration_s"].sum())

    trace, meta = schema.read_trace(work / "validation_trace.parquet")
    real_steps = schema.read(work / "steps", "steps")[0].sort("t_s")[cal.height:]
    cfg = ServingConfig(max_loras=kw["max_loras"], max_cpu_loras=int(ctx.get("max_cpu_loras", 4)),
                        max_lora_rank=kw["max_lora_rank"], max_num_seqs=int(ctx.get("max_num_seqs", 16)),
                        max_num_batched_tokens=int(ctx.get("max_num_batched_tokens", 512)))  # fmt: skip
    twin_steps = pl.from_arrow(simulate(trace, prof, cfg, trace_context=meta.context, record_steps=True).steps)
    loop = json.loads((RESULTS / f"capture_loop{tag}.json").read_text())["compare"]
    return {
        "tag": tag,
        "cal": ratio(cal),
        "val": ratio(val),
        "real_ms": 1e3 * real_steps["duration_s"].mean(),
        "twin_ms": 1e3 * twin_steps["duration_s"].mean(),
        "real_running": real_steps["num_running"].mean(),
        "twin_running": twin_steps["num_running"].mean(),
        "loop": " / ".join(
            f"{100 * m['rel_err']:+.1f}%" for m in (loop["metrics"].get(k, {}) for k in ("throughput_tok_s", "p50_ttft_ms", "mean_itl_ms"))
            if isinstance(m, dict) and m.get("rel_err") is not None
        ),
    }


def main() -> None:
    tags = sys.argv[1:] or ["_s2", "_s2_val0.7", "_s2_val0.7_rep"]
    rows = [check(t) for t in tags]
    lines = [
        "# Close-the-loop runs: the calibrated step model on the real server's own steps",
        "",
        f"Command: `.venv/bin/python benchmarks/capture_loop_steps_check.py {' '.join(tags)}` (see its docstring).",
        "",
        "| run | twin vs real: throughput / p50 TTFT / mean ITL | step model on calibration steps (pred/measured) | on validation steps | mean step ms, real / twin | mean running, real / twin |",
        "|---|---|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| capture_loop{r['tag']} | {r['loop']} | {r['cal']:.3f} | {r['val']:.3f} | "
            f"{r['real_ms']:.1f} / {r['twin_ms']:.1f} | {r['real_running']:.2f} / {r['twin_running']:.2f} |"
        )
    out = RESULTS / "capture_loop_steps_check.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
