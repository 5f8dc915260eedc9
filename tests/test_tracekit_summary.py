"""Output for people (tracekit.summary): numbers as a person reads them, the configuration
every run used, which limit a starving run hit, latency coverage, per-adapter tables that
fit 80 columns without cutting a name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from replay.cli import main as replay_main
from tracekit import schema
from tracekit.summary import fmt, per_adapter_table, render_latency, starving_reason
from tracekit.synth import synthesize
from twin.cli import main as twin_main
from twin.profile import load_profile


def test_integers_as_integers_fractions_with_three_digits() -> None:
    assert fmt(1022) == "1,022" and fmt(0) == "0"
    assert fmt(0.036, frac=True) == "0.036" and fmt(0.057, frac=True) == "0.057"
    assert fmt(1234.56) == "1,235" and fmt(27.84) == "27.8" and fmt(0.0412) == "0.041"
    assert fmt(None) == "-" and fmt(float("nan")) == "-" and fmt(True) == "yes"


SUMMARY = {"starved": True, "requests": 2000, "completed": 566}
CONFIG = {"max_loras": 1, "max_num_seqs": 256, "max_num_batched_tokens": 2048}


def test_starving_reason_names_the_limit_with_the_most_steps() -> None:
    twin = {"steps": 9000, "kv_capacity_tokens": 300_000,
            "admission_blocked": {"max_num_batched_tokens": 10, "max_num_seqs": 120, "kv_blocks": 0, "max_loras": 8411}}
    line = starving_reason(SUMMARY, twin, CONFIG)
    assert line == ("the limit it hit: adapter slots (--max-loras 1), which held waiting requests back "
                    "in 8,411 of 9,000 steps")
    twin["admission_blocked"] = {"max_num_batched_tokens": 5, "max_num_seqs": 7000, "kv_blocks": 3, "max_loras": 0}
    assert "seats (--max-num-seqs 256)" in starving_reason(SUMMARY, twin, CONFIG)
    twin["admission_blocked"] = {"max_num_batched_tokens": 0, "max_num_seqs": 0, "kv_blocks": 40, "max_loras": 0}
    assert "KV blocks (the KV cache holds 300,000 tokens)" in starving_reason(SUMMARY, twin, CONFIG)
    twin["admission_blocked"] = {"max_num_batched_tokens": 50, "max_num_seqs": 0, "kv_blocks": 0, "max_loras": 0}
    assert "tokens per step (--max-num-batched-tokens 2,048)" in starving_reason(SUMMARY, twin, CONFIG)


def test_starving_reason_says_nothing_rather_than_guess() -> None:
    assert starving_reason(SUMMARY, {"steps": 10}, CONFIG) is None  # the twin did not count
    assert starving_reason(SUMMARY, None, CONFIG) is None  # a real server
    zero = {"admission_blocked": {"max_num_batched_tokens": 0, "max_num_seqs": 0, "kv_blocks": 0, "max_loras": 0}}
    assert starving_reason(SUMMARY, zero, CONFIG) is None
    busy = {"admission_blocked": {"max_loras": 99}}
    assert starving_reason(dict(SUMMARY, starved=False), busy, CONFIG) is None  # not starving
    oom = {"oom": True, "oom_reason": "no room for the KV cache at max_loras 512"}
    assert starving_reason(dict(SUMMARY, starved=True), oom) == \
        "the server would not start: no room for the KV cache at max_loras 512"


def rows(n: int, name: str = "adapter-{i:03d}") -> list[dict]:
    return [{"adapter": name.format(i=i), "requests": i + 1, "completed": i, "unfinished": 1, "errors": 0,
             "throughput_tok_s": 1000.0 * i, "mean_ttft_ms": 12345.0, "p99_ttft_ms": 123456.0, "mean_tpot_ms": 33.3}
            for i in range(n)]


def render(table, width: int = 80) -> str:
    c = Console(width=width, record=True)
    c.print(table)
    return c.export_text()


def test_per_adapter_table_sorted_top_20_with_a_total_line() -> None:
    text = render(per_adapter_table(rows(30)))
    lines = [ln for ln in text.splitlines() if ln.startswith(" adapter-")]
    assert [ln.split()[0] for ln in lines] == [f"adapter-{i:03d}" for i in range(29, 9, -1)]
    total = next(ln for ln in text.splitlines() if ln.strip().startswith("total"))
    assert total.split()[1] == "465"  # all 30 adapters' requests, not the 20 shown
    assert "10 more adapters: --all shows every row" in text
    everything = render(per_adapter_table(rows(30), show_all=True, width=200), width=200)
    assert sum(1 for ln in everything.splitlines() if ln.startswith(" adapter-")) == 30
    assert "more adapters" not in everything


@pytest.mark.parametrize("name", ["lora-{i:04d}", "customer-support-finetune-v2-{i:03d}", "x" * 60 + "{i:02d}"])
def test_per_adapter_table_fits_80_columns_without_cutting_values(name: str) -> None:
    data = rows(25, name)
    text = render(per_adapter_table(data, width=80))
    assert max(len(ln) for ln in text.splitlines()) <= 80
    assert "…" not in text
    for r in sorted(data, key=lambda r: -r["requests"])[:20]:
        assert r["adapter"] in text
    if len(name) > 20:
        assert "left out to fit 80 columns" in text


def test_latency_table_says_how_many_requests_it_covers() -> None:
    c = Console(width=80, record=True)
    render_latency({"requests": 2000, "completed": 80, "p50_ttft_ms": 50.0, "mean_dispatch_lag_ms": None}, c)
    text = c.export_text()
    assert "latency (ms): 80 completed of 2,000 requests" in text
    assert "1,920 of 2,000 requests did not complete: the latency above is not theirs" in text


def small_trace(tmp_path: Path) -> Path:
    df, ctx = synthesize(8, [0.5], [8, 16], 30.0, lengths="fixed:64,16", seed=0)
    return schema.write(tmp_path / "t.parquet", df, "trace", ctx)


def test_twin_run_prints_and_records_the_configuration_it_ran(tmp_path: Path) -> None:
    trace = small_trace(tmp_path)
    out = tmp_path / "r.parquet"
    res = CliRunner().invoke(twin_main, ["run", str(trace), "--profile", "h100-llama-3.1-8b", "--max-loras", "4",
                                         "--out", str(out)])
    assert res.exit_code == 0, res.output
    text = res.stdout
    for line in ("max_loras                      4   flag", "max_cpu_loras                  4   = max_loras",
                 "max_lora_rank                 16   the trace's largest rank",
                 "max_num_seqs               2,048   the profile's server (vLLM 0.8.5)",
                 "max_num_batched_tokens     2,048   the profile's server"):
        assert line in text, text
    assert "kv_capacity_tokens" in text and "completed of" in text
    _, meta = schema.read(out, "results")
    cfg = meta.context["configuration"]
    assert cfg["max_cpu_loras"] == 4 and cfg["max_num_seqs"] == 2048 and cfg["kv_capacity_tokens"] > 0
    assert cfg["from"]["max_loras"] == "flag" and cfg["profile"] == "h100-llama-3.1-8b"
    assert meta.context["twin"]["kv_capacity_tokens"] == cfg["kv_capacity_tokens"]
    js = CliRunner().invoke(twin_main, ["run", str(trace), "--profile", "h100-llama-3.1-8b", "--out", str(out), "--json"])
    assert json.loads(js.stdout)["configuration"]["max_loras"] == 1
    # A later report of the results prints the same configuration.
    rep = CliRunner().invoke(replay_main, ["report", str(out)])
    assert rep.exit_code == 0 and "max_num_batched_tokens     2,048" in rep.stdout


def test_replay_run_twin_prints_the_configuration_and_json(tmp_path: Path) -> None:
    trace = small_trace(tmp_path)
    out = tmp_path / "r.parquet"
    res = CliRunner().invoke(replay_main, ["run", str(trace), "--target", "twin", "--profile", "h100-llama-3.1-8b",
                                           "--out", str(out), "--json", "--plots", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["configuration"]["max_loras"] == 1 and s["configuration"]["from"]["max_loras"] == "vLLM's default"
    assert s["out"] == str(out) and (tmp_path / "p" / "latency.png").exists()
    res = CliRunner().invoke(replay_main, ["run", str(trace), "--target", "twin", "--profile", "h100-llama-3.1-8b",
                                           "--out", str(out)])
    assert "configuration (profile h100-llama-3.1-8b)" in res.stdout and "max_num_seqs" in res.stdout


def test_a_profile_without_server_values_runs_with_vllms_defaults_for_its_gpu(tmp_path: Path) -> None:
    data = load_profile("h100-llama-3.1-8b").to_dict()
    data.pop("server")
    data["hardware"] = {"gpu": "H100", "gpu_memory_gib": 80.0}
    (tmp_path / "p.json").write_text(json.dumps(data))
    trace = small_trace(tmp_path)
    res = CliRunner().invoke(twin_main, ["run", str(trace), "--profile", str(tmp_path / "p.json"),
                                         "--out", str(tmp_path / "r.parquet"), "--json"])
    cfg = json.loads(res.stdout)["configuration"]
    assert (cfg["max_num_seqs"], cfg["max_num_batched_tokens"]) == (1024, 8192)
    assert cfg["from"]["max_num_seqs"] == "vLLM 0.32.0's API-server defaults for H100 with 80 GiB"


def test_oom_says_the_server_would_not_start(tmp_path: Path) -> None:
    trace = small_trace(tmp_path)
    res = CliRunner().invoke(twin_main, ["run", str(trace), "--profile", "h100-llama-3.1-8b", "--max-loras", "4",
                                         "--kv-capacity-tokens", "0", "--out", str(tmp_path / "r.parquet")])
    assert res.exit_code == 0, res.output
    assert "OOM: the server would not start" in res.stdout
    rep = CliRunner().invoke(replay_main, ["report", str(tmp_path / "r.parquet")])
    assert "OOM: the server would not start" in rep.stdout
