"""The twin's memory model against every KV capacity vLLM reported (issue 6, item 2).

    .venv/bin/python benchmarks/twin_kv_capacity.py

For each shipped H100 profile, every start-up report it was fitted on (the KV table plus
the calibration runs that logged KV tokens, at other `max_num_seqs`): the KV tokens vLLM
reported, the twin's estimate, the error. Then, per slots x rank (`max_loras` x
`max_lora_rank`), what the KV cache plus vLLM's logged weights took: if vLLM's budget
were smooth in the configuration this sum would be the same for every row, and where it
dips, no smooth memory model can follow.

Writes benchmarks/results/twin_kv_capacity.{md,json}. Reads only twin/data and the
shipped profiles.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results"
GIB = 1024**3
PROFILES = {"h100-llama-3.1-8b": "llama-3.1-8b-instruct", "h100-qwen-2.5-7b": "qwen-2.5-7b-instruct"}


def _fit_script() -> Any:
    # The rows a profile is fitted on are chosen by the fitting script; score the same rows.
    spec = importlib.util.spec_from_file_location("fit_h100_profiles", ROOT / "scripts" / "fit_h100_profiles.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    from twin.memory import estimate_kv

    fit = _fit_script()
    rows: list[dict[str, Any]] = []
    for prof, model in PROFILES.items():
        mem = json.loads((ROOT / "twin" / "profiles" / f"{prof}.json").read_text())["memory"]
        for r in fit.memory_runs(model):
            est = estimate_kv(mem, max_loras=int(r["max_loras"] or 1), max_lora_rank=int(r["max_lora_rank"] or 16),
                              enable_lora=bool(r["enable_lora"]), max_num_seqs=int(r["max_num_seqs"]))  # fmt: skip
            real = int(r["kv_cache_tokens"])
            kv_gib = real * mem["kv_bytes_per_token"] / GIB
            rows.append({
                "profile": prof, "enable_lora": bool(r["enable_lora"]),
                "max_loras": int(r["max_loras"]) if r["enable_lora"] else None,
                "max_lora_rank": int(r["max_lora_rank"]) if r["enable_lora"] else None,
                "max_num_seqs": int(r["max_num_seqs"]), "kv_tokens_real": real, "kv_tokens_twin": est.kv_tokens,
                "error_pct": 100 * (est.kv_tokens - real) / real,
                "kv_gib": kv_gib, "kv_plus_weights_gib": kv_gib + float(r["model_weights_gib"]),
            })  # fmt: skip
    df = pl.DataFrame(rows)
    summary = (
        df.group_by("profile", maintain_order=True)
        .agg(runs=pl.len(), mean_abs_pct=pl.col("error_pct").abs().mean(), max_abs_pct=pl.col("error_pct").abs().max(),
             over_2pct=(pl.col("error_pct").abs() > 2).sum())  # fmt: skip
    )
    # The dips: LoRA rows at the paper's max_num_seqs (2048), by slots x rank.
    lora = df.filter(pl.col("enable_lora") & (pl.col("max_num_seqs") == 2048)).with_columns(
        slots_x_rank=pl.col("max_loras") * pl.col("max_lora_rank")
    )
    dips = (
        lora.group_by("profile", "slots_x_rank")
        .agg(pl.col("kv_plus_weights_gib").mean(), pl.col("error_pct").mean(), configs=pl.len())
        .with_columns(below_top_gib=pl.col("kv_plus_weights_gib").max().over("profile") - pl.col("kv_plus_weights_gib"))
        .sort("profile", "slots_x_rank")
    )
    # The floor: even knowing vLLM's logged weights of every row exactly, the best single
    # budget C for "KV + weights" (KV = C - weights) leaves this worst relative error: the
    # dips are outside the weights.
    floor: dict[str, float] = {}
    for (prof,), g in lora.group_by("profile", maintain_order=True):
        tot, kv = g["kv_plus_weights_gib"].to_numpy(), g["kv_gib"].to_numpy()
        grid = np.arange(tot.min(), tot.max(), 0.0005)
        floor[prof] = float(100 * min(np.max(np.abs(c - tot) / kv) for c in grid))
    cmd = ".venv/bin/python benchmarks/twin_kv_capacity.py"
    meta = {"command": cmd, "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, Python {platform.python_version()}"}  # fmt: skip
    OUT.mkdir(exist_ok=True)
    (OUT / "twin_kv_capacity.json").write_text(json.dumps(
        {"meta": meta, "summary": summary.to_dicts(), "floor_with_logged_weights_pct": floor, "rows": df.to_dicts(),
         "by_slots_x_rank": dips.to_dicts()}, indent=1))  # fmt: skip
    lines = [
        "# The twin's KV capacity against vLLM's reports (shipped H100 profiles)",
        "",
        f"Command: `{cmd}` ({meta['date_utc']}; {meta['machine']}). Data: twin/data/kv_cache_capacity.csv and the "
        "runs of twin/data/calibration_runs.csv that logged KV tokens (the rows the profiles are fitted on, "
        "by `twin.memory.fit_memory`, a minimax fit of the worst relative error). Goal (issue 6): every row within 2%.",
        "",
        "| profile | runs | mean abs error | max abs error | rows over 2% |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in summary.iter_rows(named=True):
        lines.append(f"| {s['profile']} | {s['runs']} | {s['mean_abs_pct']:.2f}% | {s['max_abs_pct']:.2f}% | {s['over_2pct']} |")
    lines += [
        "",
        "KV cache + vLLM's logged weights (GiB), LoRA rows at max_num_seqs 2048, by slots x rank. Rows with the "
        "same slots x rank report the same KV tokens (e.g. 32x32, 64x16 and 128x8), so the budget depends on "
        "the LoRA buffers' total size; but it is not smooth in it: both models lose 0.4-0.8 GiB at 1024 and "
        "nothing at 512 or 2048. vLLM's start-up reports in the data do not split activation peak from "
        "non-torch memory, so the dips cannot be attributed; a smooth model has to spread them. Even with "
        "every row's logged weights known exactly (allocator lumps included), the best single budget for "
        "KV + weights leaves a worst error of "
        + ", ".join(f"{v:.2f}% ({k})" for k, v in floor.items()) + " on these LoRA rows.",
        "",
        "| profile | slots x rank | configs | KV + weights GiB | below the top | mean twin error |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for d in dips.iter_rows(named=True):
        lines.append(f"| {d['profile']} | {d['slots_x_rank']} | {d['configs']} | {d['kv_plus_weights_gib']:.2f} "
                     f"| {d['below_top_gib']:.2f} | {d['error_pct']:+.2f}% |")  # fmt: skip
    lines += ["", "Every row: twin_kv_capacity.json."]
    (OUT / "twin_kv_capacity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:10 + summary.height]))


if __name__ == "__main__":
    main()
