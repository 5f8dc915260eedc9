"""`replay run --target vllm` against a real HTTP streaming server (replay.fast_server):
what is sent, what is recorded, errors, timeouts, cuts, concurrency caps and signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from replay.cli import main as replay_main
from replay.fast_server import BASE_MODEL, BackgroundServer, ServerState
from tracekit.schema import new_context, read, read_meta, write

REPO = Path(__file__).resolve().parents[1]
FAULTS = {"fail-500": "-", "hang": "-", "drop": "-", "midstream-error": "-"}


def make_trace(path: Path, n: int = 60, rate: float = 100.0, adapters: list[str | None] | None = None,
               seed: int = 0, window_s: float | None = None, ranks: dict[str, int] | None = None,
               with_ids: bool = False) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    adapters = adapters if adapters is not None else [None, "a1", "a2", "a3"]
    data: dict[str, object] = {
        "request_id": [f"r{i}" for i in range(n)],
        "arrival_s": np.cumsum(rng.exponential(1 / rate, n)),
        "adapter": [adapters[i % len(adapters)] for i in range(n)],
        "prompt_tokens": rng.integers(3, 40, n).astype(np.int32),
        "output_tokens": rng.integers(2, 12, n).astype(np.int32),
    }
    if with_ids:
        data["prompt_token_ids"] = [list(range(7, 7 + int(k))) for k in data["prompt_tokens"]]  # type: ignore[union-attr]
    df = pl.DataFrame(data)
    ctx = new_context(window_s=window_s, adapters={a: {"rank": (ranks or {}).get(a, 8), "path": None}
                                                   for a in adapters if a is not None})
    write(path, df, "trace", ctx)
    return df


def make_lora_dir(root: Path, ranks: dict[str, int]) -> Path:
    for name, r in ranks.items():
        (root / name).mkdir(parents=True)
        (root / name / "adapter_config.json").write_text(json.dumps({"r": r}))
    return root


def run_cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(replay_main, list(args), catch_exceptions=False)
    return res.exit_code, res.output


@pytest.fixture()
def server() -> BackgroundServer:
    with BackgroundServer(ServerState(itl_s=0.001, keep_seen=100_000, adapters=dict(FAULTS))) as s:
        yield s


@pytest.mark.parametrize("client", ["h1", "aiohttp"])
def test_replay_sends_the_trace_and_records_every_token(tmp_path: Path, server: BackgroundServer, client: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # h1: the default synchronous-dispatch client; aiohttp: the fallback (TRACEKIT_REPLAY_HTTP).
    monkeypatch.setenv("TRACEKIT_REPLAY_HTTP", client)
    trace = make_trace(tmp_path / "t.parquet", n=60)
    loras = make_lora_dir(tmp_path / "loras", {"real8": 8})
    code, out = run_cli("run", str(tmp_path / "t.parquet"), "--target", "vllm", "--url", server.url,
                        "--lora-dir", str(loras), "--out", str(tmp_path / "r.parquet"), "--no-progress")
    assert code == 0, out
    res, meta = read(tmp_path / "r.parquet", "results")
    res = res.sort("arrival_s")
    assert (res["status"] == "ok").all()
    assert res["generated_tokens"].to_list() == trace["output_tokens"].to_list()
    # One gap per token after the first, each gap measured (the server sleeps 1 ms).
    assert [len(x) for x in res["itl_s"].to_list()] == [k - 1 for k in trace["output_tokens"].to_list()]
    gaps_total = np.array([sum(x) for x in res["itl_s"].to_list()])
    np.testing.assert_allclose(gaps_total, (res["end_s"] - res["first_token_s"]).to_numpy(), atol=1e-4)
    assert res["itl_s"].explode().mean() > 0.0008
    assert (res["ttft_s"] > 0).all() and (res["e2e_s"] >= res["ttft_s"]).all()
    lag = (res["dispatch_s"] - res["arrival_s"]).to_numpy()
    assert lag.min() > -0.002 and np.median(lag) < 0.05
    # The server saw exactly the trace's work: model per adapter, prompt length, max_tokens.
    seen = sorted(server.state.seen, key=lambda b: len(b["prompt"]) * 1000 + b["max_tokens"])
    want = sorted(trace.iter_rows(named=True), key=lambda r: r["prompt_tokens"] * 1000 + r["output_tokens"])
    assert len(seen) == trace.height
    for body, row in zip(seen, want, strict=True):
        assert len(body["prompt"]) == row["prompt_tokens"] and body["max_tokens"] == row["output_tokens"]
        assert body["ignore_eos"] is True and body["stream"] is True
        assert all(1000 <= t < 2000 for t in body["prompt"])
    models = {b["model"] for b in server.state.seen}
    assert models == {BASE_MODEL, "a1", "a2", "a3"}
    # a1..a3 were unknown: loaded from the same-rank folder before anything was sent.
    assert set(server.state.adapters) >= {"a1", "a2", "a3"}
    assert meta.context["adapters_loaded"]["a1"].endswith("real8")
    assert meta.context["target"] == "vllm" and meta.context["url"] == server.url


def test_captured_prompt_ids_are_sent_verbatim(tmp_path: Path, server: BackgroundServer) -> None:
    make_trace(tmp_path / "t.parquet", n=10, adapters=[None], with_ids=True)
    code, out = run_cli("run", str(tmp_path / "t.parquet"), "--target", "vllm", "--url", server.url,
                        "--out", str(tmp_path / "r.parquet"), "--no-progress")
    assert code == 0, out
    for body in server.state.seen:
        assert body["prompt"] == list(range(7, 7 + len(body["prompt"])))


def test_unresolvable_adapter_fails_before_sending(tmp_path: Path, server: BackgroundServer) -> None:
    make_trace(tmp_path / "t.parquet", n=10, adapters=["a1", "zz"], ranks={"a1": 8, "zz": 64})
    loras = make_lora_dir(tmp_path / "loras", {"a1": 8})
    code, out = run_cli("run", str(tmp_path / "t.parquet"), "--target", "vllm", "--url", server.url,
                        "--lora-dir", str(loras), "--out", str(tmp_path / "r.parquet"), "--no-progress")
    assert code == 2
    assert out.strip().splitlines() == [
        "error: 1 adapter(s) unknown to the server and not found: zz; nothing was sent"]
    assert server.state.seen == [] and server.state.load_calls == 0
    assert not (tmp_path / "r.parquet").exists()


@pytest.mark.parametrize("client", ["h1", "aiohttp"])
def test_errors_timeouts_and_drops_are_recorded_per_request(tmp_path: Path, server: BackgroundServer, client: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # h1: the default synchronous-dispatch client; aiohttp: the fallback (TRACEKIT_REPLAY_HTTP).
    monkeypatch.setenv("TRACEKIT_REPLAY_HTTP", client)
    make_trace(tmp_path / "t.parquet", n=20, adapters=[None, "fail-500", "hang", "drop", "midstream-error"])
    t0 = time.monotonic()
    code, out = run_cli("run", str(tmp_path / "t.parquet"), "--target", "vllm", "--url", server.url,
                        "--request-timeout", "0.5", "--out", str(tmp_path / "r.parquet"), "--no-progress")
    assert code == 0, out
    assert time.monotonic() - t0 < 20  # 0.5 s timeouts, not the 300 s default
    res, _ = read(tmp_path / "r.parquet", "results")
    by = {a: g for (a,), g in res.with_columns(pl.col("adapter").fill_null("base")).group_by("adapter")}
    assert (by["base"]["status"] == "ok").all()
    assert (by["fail-500"]["status"] == "error").all()
    assert by["fail-500"]["error"][0] == "HTTP 500: injected failure"
    assert (by["hang"]["status"] == "timeout").all()
    assert (by["drop"]["status"] == "error").all()
    assert (by["midstream-error"]["status"] == "error").all()
    assert "injected mid-stream error" in by["midstream-error"]["error"][0]
    # Failed requests carry no latencies: they would bias the percentiles.
    assert res.filter(pl.col("status") != "ok")["ttft_s"].null_count() == 16


def test_window_cuts_and_marks_unfinished(tmp_path: Path, server: BackgroundServer) -> None:
    make_trace(tmp_path / "t.parquet", n=40, rate=20.0, adapters=[None, "hang"])  # ~2 s of arrivals
    t0 = time.monotonic()
    code, out = run_cli("run", str(tmp_path / "t.parquet"), "--target", "vllm", "--url", server.url,
                        "--window", "1.0", "--out", str(tmp_path / "r.parquet"), "--no-progress")
    assert code == 0, out
    assert time.monotonic() - t0 < 15  # cut at 1 s, not waiting for `hang`
    res, meta = read(tmp_path / "r.parquet", "results")
    assert meta.context["window_s"] == 1.0
    late = res.filter(pl.col("arrival_s") > 1.0)
    assert (late["status"] == "unfinished").all() and late["dispatch_s"].null_count() == late.height
    assert (res.filter(pl.col("adapter") == "hang")["status"] == "unfinished").all()
    early_base = res.filter((pl.col("arrival_s") < 0.9) & pl.col("adapter").is_null())
    assert (early_base["status"] == "ok").all()


def test_trace_window_is_the_default_cut_and_drain_overrides_it(tmp_path: Path, server: BackgroundServer) -> None:
    make_trace(tmp_path / "t.parquet", n=40, rate=40.0, adapters=[None], window_s=0.5)
    code, _ = run_cli("run", str(tmp_path / "t.parquet"), "--target", "vllm", "--url", server.url,
                      "--out", str(tmp_path / "cut.parquet"), "--no-progress")
    assert code == 0
    cut, _ = read(tmp_path / "cut.parquet", "results")
    assert (cut.filter(pl.col("arrival_s") > 0.5)["status"] == "unfinished").all()
    code, _ = run_cli("run", str(tmp_path / "t.parquet"), "--target", "vllm", "--url", server.url,
                      "--drain", "--out", str(tmp_path / "all.parquet"), "--no-progress")
    assert code == 0
    full, meta = read(tmp_path / "all.parquet", "results")
    assert (full["status"] == "ok").all() and "window_s" not in meta.context
    # The old names still work for one version, with a note.
    code, out = run_cli("run", str(tmp_path / "t.parquet"), "--target", "vllm", "--url", server.url,
                        "--until-done", "--out", str(tmp_path / "old.parquet"), "--no-progress")
    assert code == 0 and "note: --until-done is now --drain" in out
    assert (read(tmp_path / "old.parquet", "results")[0]["status"] == "ok").all()


def test_max_concurrency_caps_requests_in_flight(tmp_path: Path) -> None:
    with BackgroundServer(ServerState(itl_s=0.005)) as srv:
        make_trace(tmp_path / "t.parquet", n=30, rate=1000.0, adapters=[None])
        code, out = run_cli("run", str(tmp_path / "t.parquet"), "--target", "vllm", "--url", srv.url,
                            "--max-concurrency", "3", "--out", str(tmp_path / "r.parquet"), "--no-progress")
    assert code == 0, out
    res, _ = read(tmp_path / "r.parquet", "results")
    assert (res["status"] == "ok").all()
    starts, ends = res["dispatch_s"].to_numpy(), res["end_s"].to_numpy()
    in_flight = [int(((starts <= t) & (ends > t)).sum()) for t in starts]
    assert max(in_flight) <= 3
    assert max(in_flight) == 3  # the cap is reached, so it is what limited the run
    # Held-back requests show it as dispatch lag.
    assert (res["dispatch_s"] - res["arrival_s"]).max() > 0.02


def test_warmup_excludes_early_requests_from_metrics(tmp_path: Path, server: BackgroundServer) -> None:
    make_trace(tmp_path / "t.parquet", n=40, rate=40.0, adapters=[None])
    code, _ = run_cli("run", str(tmp_path / "t.parquet"), "--target", "vllm", "--url", server.url,
                      "--warmup", "0.5", "--out", str(tmp_path / "r.parquet"), "--no-progress")
    assert code == 0
    code, out = run_cli("report", str(tmp_path / "r.parquet"), "--json")
    s = json.loads(out)
    res, _ = read(tmp_path / "r.parquet", "results")
    assert s["requests"] == int((res["arrival_s"] >= 0.5).sum()) < res.height
    assert s["warmup_s"] == 0.5


def test_sigterm_stops_sending_and_writes_what_is_done(tmp_path: Path, server: BackgroundServer) -> None:
    # Base requests finish; `hang` ones are in flight when SIGTERM comes; later ones never go.
    make_trace(tmp_path / "t.parquet", n=200, rate=20.0, adapters=[None, "hang"])
    out_path = tmp_path / "r.parquet"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "replay"), "run", str(tmp_path / "t.parquet"), "--target", "vllm",
         "--url", server.url, "--drain-timeout", "0.5", "--out", str(out_path), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        # Signal once it is well into sending (process start-up varies on a busy machine).
        deadline = time.monotonic() + 60
        while len(server.state.seen) < 20 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    res, meta = read(out_path, "results")
    assert meta.context["interrupted"] is True
    stopped = meta.context["window_s"]
    assert 0.5 < stopped < 9.0
    assert (res.filter(pl.col("arrival_s") > stopped + 0.1)["status"] == "unfinished").all()
    assert (res.filter(pl.col("adapter") == "hang")["status"] == "unfinished").all()
    done = res.filter(pl.col("adapter").is_null() & (pl.col("arrival_s") < stopped - 0.2))
    assert done.height >= 5 and (done["status"] == "ok").all()
    assert read_meta(out_path).kind == "results"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", "vllm"], "error: --target vllm needs --url"),
        (["--target", "vllm", "--url", "http://127.0.0.1:9", "--speed", "0"], "error: --speed must be positive"),
        (["--target", "vllm", "--url", "http://127.0.0.1:9", "--max-loras", "4"],
         "error: --max-loras does not apply to --target vllm"),
        (["--target", "twin", "--url", "http://x"], "error: --url does not apply to --target twin"),
        (["--target", "vllm", "--url", "http://127.0.0.1:9"], "error: --url http://127.0.0.1:9: cannot reach the server"),
    ],
)
def test_bad_flags_give_one_error_line(tmp_path: Path, args: list[str], message: str) -> None:
    make_trace(tmp_path / "t.parquet", n=5)
    res = CliRunner().invoke(replay_main, ["run", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "r.parquet"), *args])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), res.output


def test_not_a_trace_is_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("a,b\n1,2\n")
    res = CliRunner().invoke(replay_main, ["run", str(tmp_path / "t.csv"), "--target", "vllm", "--url", "http://x",
                                           "--out", str(tmp_path / "r.parquet")])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "not a Parquet file" in res.output


def test_speed_scales_the_offered_load(tmp_path: Path, server: BackgroundServer) -> None:
    trace = make_trace(tmp_path / "t.parquet", n=30, rate=30.0, adapters=[None], window_s=1.0)
    code, out = run_cli("run", str(tmp_path / "t.parquet"), "--target", "vllm", "--url", server.url,
                        "--speed", "2", "--out", str(tmp_path / "r.parquet"), "--no-progress")
    assert code == 0, out
    res, meta = read(tmp_path / "r.parquet", "results")
    res = res.sort("request_id")
    want = trace.sort("request_id")["arrival_s"].to_numpy() / 2
    np.testing.assert_allclose(res["arrival_s"].to_numpy(), want)
    assert meta.context["speed"] == 2.0 and meta.context["window_s"] == 0.5
    assert res["dispatch_s"].drop_nulls().max() < 0.6


def test_unwritable_out_fails_before_sending(tmp_path: Path, server: BackgroundServer) -> None:
    make_trace(tmp_path / "t.parquet", n=5, adapters=[None])
    (tmp_path / "outdir").mkdir()
    code, out = run_cli("run", str(tmp_path / "t.parquet"), "--target", "vllm", "--url", server.url,
                        "--out", str(tmp_path / "outdir"), "--no-progress")
    assert code == 2 and out.strip() == f"error: --out {tmp_path / 'outdir'}: is a directory; give a file name"
    assert server.state.seen == []
