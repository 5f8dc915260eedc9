"""End to end on a real vLLM server (CPU): a 200-request trace over four adapters and the
base model, replayed open-loop; then the same trace on the twin; then `replay compare`.

Two adapters are served from the start, one is loaded by name from --lora-dir, and one
(a synthetic name) is loaded from a folder of the same rank, as with the paper's 384
adapters run on copies of a few real ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import vllm_support
from click.testing import CliRunner

from replay.cli import main as replay_main
from tracekit.schema import new_context, read, write

pytestmark = pytest.mark.vllm


def test_replay_real_vllm_then_twin_then_compare(tmp_path: Path, tiny_model: Path, tiny_adapters: dict[str, Path]) -> None:
    ranks = {"a1": 8, "a2": 16, "a3": 8, "syn-r16": 16}
    names: list[str | None] = [None, "a1", "a2", "a3", "syn-r16"]
    n = 200
    rng = np.random.default_rng(3)
    trace = pl.DataFrame({
        "request_id": [f"req-{i:04d}" for i in range(n)],
        "arrival_s": np.cumsum(rng.exponential(1 / 25.0, n)),  # ~8 s at 25 req/s
        "adapter": [names[i] for i in rng.integers(0, len(names), n)],
        "prompt_tokens": rng.integers(8, 64, n).astype(np.int32),
        "output_tokens": rng.integers(2, 24, n).astype(np.int32),
    })
    tpath = write(tmp_path / "trace.parquet", trace, "trace",
                  new_context(source="test", adapters={k: {"rank": r, "path": None} for k, r in ranks.items()}))
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    (lora_dir / "a3").symlink_to(tiny_adapters["a3"])
    (lora_dir / "zz-r16-copy").symlink_to(tiny_adapters["a4"])  # rank 16: serves syn-r16

    served = {"a1": tiny_adapters["a1"], "a2": tiny_adapters["a2"]}
    with vllm_support.VllmServer(tiny_model, served, max_loras=2, max_cpu_loras=4, max_num_seqs=8) as srv:
        res = CliRunner().invoke(replay_main, [
            "run", str(tpath), "--target", "vllm", "--url", srv.url, "--lora-dir", str(lora_dir),
            "--request-timeout", "60", "--out", str(tmp_path / "real.parquet"), "--no-progress"])
        assert res.exit_code == 0, res.output + srv.log_tail()

    real, meta = read(tmp_path / "real.parquet", "results")
    assert real.height == n
    bad = real.filter(pl.col("status") != "ok")
    assert bad.height == 0, bad.select("request_id", "adapter", "status", "error").head(5)
    real = real.join(trace.select("request_id", pl.col("output_tokens").alias("want")), on="request_id")
    assert (real["generated_tokens"] == real["want"]).all()
    assert real["ttft_s"].null_count() == 0 and (real["ttft_s"] > 0).all()
    # One gap per streamed chunk; a busy server may put several tokens in one chunk
    # (seen at a load average of 12 on two cores), so gaps <= tokens - 1.
    gaps = [len(x) for x in real["itl_s"].to_list()]
    tokens = real["generated_tokens"].to_list()
    assert all(0 <= g <= k - 1 for g, k in zip(gaps, tokens, strict=True))
    longer = [g for g, k in zip(gaps, tokens, strict=True) if k >= 4]
    assert sum(g >= 1 for g in longer) >= 0.5 * len(longer)
    np.testing.assert_allclose([sum(x) for x in real["itl_s"].to_list()],
                               (real["end_s"] - real["first_token_s"]).to_numpy(), atol=1e-3)
    assert set(meta.context["adapters_loaded"]) == {"a3", "syn-r16"}
    assert meta.context["adapters_loaded"]["syn-r16"] == str((lora_dir / "zz-r16-copy").resolve())
    assert set(real["adapter"].drop_nulls().unique()) == {"a1", "a2", "a3", "syn-r16"}

    res = CliRunner().invoke(replay_main, [
        "run", str(tpath), "--target", "twin", "--profile", "h100-llama-3.1-8b", "--max-loras", "2",
        "--max-cpu-loras", "4", "--max-num-seqs", "8", "--max-lora-rank", "16", "--out", str(tmp_path / "twin.parquet")])
    assert res.exit_code == 0, res.output
    twin, _ = read(tmp_path / "twin.parquet", "results")
    assert (twin["status"] == "ok").all()

    res = CliRunner().invoke(replay_main, ["compare", str(tmp_path / "real.parquet"), str(tmp_path / "twin.parquet"),
                                           "--json", "--plots", str(tmp_path / "plots")])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output.splitlines()[0])
    assert d["metrics"]["completed"] == {"a": n, "b": n, "rel_err": 0.0}
    assert {r["adapter"] for r in d["per_adapter"]} == {"<base>", "a1", "a2", "a3", "syn-r16"}
    assert (tmp_path / "plots" / "compare_latency.png").stat().st_size > 5000
