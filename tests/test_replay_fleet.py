"""`replay run --url URL1,URL2 --plan PLAN --router R` against real HTTP streaming servers
(replay.fast_server): every request goes where the router says, with the prompt a
single-server replay sends; one results file with a `replica` column; `replay compare`
per replica against the fleet twin."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from replay.cli import main as replay_main
from replay.fast_server import BackgroundServer, ServerState
from replay.fleet_compare import saturation_onset
from tracekit.schema import new_context, read, write

ADAPTERS = ["a1", "a2", "a3", "a4"]


def make_trace(path: Path, n: int = 80, rate: float = 80.0, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    df = pl.DataFrame({
        "request_id": [f"r{i:03d}" for i in range(n)],
        "arrival_s": np.cumsum(rng.exponential(1 / rate, n)),
        "adapter": [ADAPTERS[i] for i in rng.integers(0, len(ADAPTERS), n)],
        "prompt_tokens": rng.integers(3, 30, n).astype(np.int32),
        "output_tokens": rng.integers(2, 10, n).astype(np.int32),
    })
    write(path, df, "trace", new_context(adapters={a: {"rank": 8, "path": None} for a in ADAPTERS}))
    return df


def make_plan(path: Path, groups: list[list[str]], **settings) -> Path:  # type: ignore[no-untyped-def]
    path.write_text(json.dumps({"gpus": [{"name": f"g{i}", "adapters": g, **settings} for i, g in enumerate(groups)]}))
    return path


def lora_dir(root: Path) -> Path:
    for a in ADAPTERS:
        (root / a).mkdir(parents=True)
        (root / a / "adapter_config.json").write_text(json.dumps({"r": 8}))
    return root


def run_cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(replay_main, list(args), catch_exceptions=False)
    return r.exit_code, r.output


@pytest.fixture()
def servers():  # type: ignore[no-untyped-def]
    with BackgroundServer(ServerState(itl_s=0.002, keep_seen=10_000)) as s1, \
         BackgroundServer(ServerState(itl_s=0.002, keep_seen=10_000)) as s2:
        yield s1, s2


@pytest.mark.parametrize("client", ["h1", "aiohttp"])
def test_placement_sends_each_adapter_to_its_server(tmp_path: Path, servers, client: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    if client == "aiohttp":
        monkeypatch.setenv("TRACEKIT_REPLAY_HTTP", "aiohttp")
    s1, s2 = servers
    df = make_trace(tmp_path / "t.parquet")
    plan = make_plan(tmp_path / "plan.json", [["a1", "a2"], ["a3", "a4"]], max_loras=2)
    code, out = run_cli("run", str(tmp_path / "t.parquet"), "--target", "vllm", "--url", f"{s1.url},{s2.url}",
                        "--plan", str(plan), "--lora-dir", str(lora_dir(tmp_path / "loras")), "--no-progress",
                        "--out", str(tmp_path / "real.parquet"))
    assert code == 0, out
    res, meta = read(tmp_path / "real.parquet", "results")
    assert (res["status"] == "ok").all() and res.height == df.height
    want = {"a1": "g0", "a2": "g0", "a3": "g1", "a4": "g1"}
    assert res["replica"].to_list() == [want[a] for a in res["adapter"].to_list()]
    # Each server got exactly its adapters' requests, and registered only those.
    assert sorted(b["model"] for b in s1.state.seen) == sorted(a for a in df["adapter"] if want[a] == "g0")
    assert sorted(b["model"] for b in s2.state.seen) == sorted(a for a in df["adapter"] if want[a] == "g1")
    assert set(s1.state.adapters) == {"a1", "a2"} and set(s2.state.adapters) == {"a3", "a4"}
    assert meta.context["fleet"]["router"] == "placement"
    assert [g["url"] for g in meta.context["fleet"]["gpus"]] == [s1.url, s2.url]


def test_prompts_are_those_of_a_single_server_replay(tmp_path: Path, servers) -> None:  # type: ignore[no-untyped-def]
    s1, s2 = servers
    make_trace(tmp_path / "t.parquet", n=40)
    loras = lora_dir(tmp_path / "loras")
    plan = make_plan(tmp_path / "plan.json", [ADAPTERS, ADAPTERS])
    code, out = run_cli("run", str(tmp_path / "t.parquet"), "--target", "vllm", "--url", f"{s1.url},{s2.url}",
                        "--plan", str(plan), "--router", "round-robin", "--lora-dir", str(loras), "--no-progress",
                        "--out", str(tmp_path / "fleet.parquet"))
    assert code == 0, out
    fleet_bodies = [b["prompt"] for b in s1.state.seen] + [b["prompt"] for b in s2.state.seen]
    res, _ = read(tmp_path / "fleet.parquet", "results")
    assert res["replica"].to_list() == [("g0", "g1")[i % 2] for i in range(res.height)]
    s1.state.seen.clear()
    code, out = run_cli("run", str(tmp_path / "t.parquet"), "--target", "vllm", "--url", s1.url, "--lora-dir", str(loras),
                        "--no-progress", "--out", str(tmp_path / "single.parquet"))
    assert code == 0, out
    assert sorted(map(tuple, fleet_bodies)) == sorted(map(tuple, (b["prompt"] for b in s1.state.seen)))


def test_least_loaded_favours_the_faster_server(tmp_path: Path) -> None:
    make_trace(tmp_path / "t.parquet", n=120, rate=150.0)
    plan = make_plan(tmp_path / "plan.json", [ADAPTERS, ADAPTERS])
    with BackgroundServer(ServerState(itl_s=0.001)) as fast, BackgroundServer(ServerState(ttft_s=0.05, itl_s=0.02)) as slow:
        code, out = run_cli("run", str(tmp_path / "t.parquet"), "--target", "vllm", "--url", f"{fast.url},{slow.url}",
                            "--plan", str(plan), "--router", "least-loaded", "--lora-dir", str(lora_dir(tmp_path / "l")),
                            "--no-progress", "--out", str(tmp_path / "r.parquet"))
    assert code == 0, out
    res, _ = read(tmp_path / "r.parquet", "results")
    counts = res["replica"].value_counts().sort("replica")["count"].to_list()
    assert (res["status"] == "ok").all()
    assert counts[0] > 2 * counts[1], counts  # the slow server keeps requests longer


def test_fleet_compare_against_the_fleet_twin(tmp_path: Path, servers) -> None:  # type: ignore[no-untyped-def]
    s1, s2 = servers
    make_trace(tmp_path / "t.parquet")
    plan = make_plan(tmp_path / "plan.json", [["a1", "a2"], ["a3", "a4"]], max_loras=2, max_num_seqs=8)
    code, out = run_cli("run", str(tmp_path / "t.parquet"), "--target", "vllm", "--url", f"{s1.url},{s2.url}",
                        "--plan", str(plan), "--lora-dir", str(lora_dir(tmp_path / "loras")), "--no-progress",
                        "--out", str(tmp_path / "real.parquet"))
    assert code == 0, out
    code, out = run_cli("run", str(tmp_path / "t.parquet"), "--target", "twin", "--profile", "h100-llama-3.1-8b",
                        "--plan", str(plan), "--out", str(tmp_path / "twin.parquet"))
    assert code == 0, out
    twin, meta = read(tmp_path / "twin.parquet", "results")
    assert set(twin["replica"].unique()) == {"g0", "g1"}
    code, out = run_cli("compare", str(tmp_path / "real.parquet"), str(tmp_path / "twin.parquet"), "--json")
    assert code == 0, out
    d = json.loads(out.splitlines()[0])
    pr = d["per_replica"]
    assert [r["replica"] for r in pr["replicas"]] == ["g0", "g1"] and pr["same_replica_frac"] == 1.0
    assert all(r["completed_a"] == r["completed_b"] for r in pr["replicas"])
    code, out = run_cli("compare", str(tmp_path / "real.parquet"), str(tmp_path / "twin.parquet"))
    assert code == 0 and "per replica" in out and "saturates first" in out


def test_saturation_onset_needs_a_lasting_queue() -> None:
    # 4 seats; a burst of 6 at t=1 that clears by 1.5, then from t=5 on arrivals outpace ends.
    arr = [1.0] * 6 + [5.0 + 0.1 * i for i in range(40)]
    end = [1.4] * 6 + [5.5 + 0.3 * i for i in range(40)]
    df = pl.DataFrame({"arrival_s": arr, "end_s": end})
    assert saturation_onset(df, seats=4, hold_s=1.0) == pytest.approx(5.4, abs=0.11)
    assert saturation_onset(df, seats=100, hold_s=1.0) is None


@pytest.mark.parametrize("args,message", [
    (["--url", "URLS"], "--url lists several servers: pass --plan PLAN"),
    (["--url", "ONE", "--plan", "PLAN"], "--url lists 1 server(s) for the 2 GPU(s)"),
    (["--url", "ONE", "--router", "round-robin"], "--router needs --plan PLAN"),
    (["--url", "URLS", "--plan", "SHORT"], "1 trace adapter(s) on no GPU of the plan: a4"),
])
def test_bad_fleet_flags_are_one_error_line(tmp_path: Path, servers, args: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    s1, s2 = servers
    make_trace(tmp_path / "t.parquet")
    plan = make_plan(tmp_path / "plan.json", [["a1", "a2"], ["a3", "a4"]])
    short = make_plan(tmp_path / "short.json", [["a1", "a2"], ["a3"]])
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"gpus": [{"name": "g0", "adapters": ["a1", "a2"]},
                                        {"name": "g1", "adapters": ["a3", "a4"], "max_loras": 512, "max_lora_rank": 256}]}))
    subst = {"URLS": f"{s1.url},{s2.url}", "ONE": s1.url, "PLAN": str(plan), "SHORT": str(short), "BIG": str(big)}
    code, out = run_cli("run", str(tmp_path / "t.parquet"), "--target", "vllm", *[subst.get(a, a) for a in args],
                        "--no-progress", "--out", str(tmp_path / "r.parquet"))
    assert code == 2 and out.startswith("error: ") and message in out and len(out.strip().splitlines()) == 1, out


def test_bad_plans_on_the_fleet_twin_are_one_error_line(tmp_path: Path) -> None:
    make_trace(tmp_path / "t.parquet")
    short = make_plan(tmp_path / "short.json", [["a1", "a2"], ["a3"]])
    code, out = run_cli("run", str(tmp_path / "t.parquet"), "--target", "twin", "--profile", "h100-llama-3.1-8b",
                        "--plan", str(short), "--out", str(tmp_path / "r.parquet"))
    assert code == 2 and out.strip().endswith("1 trace adapter(s) on no GPU of the plan: a4") and len(out.strip().splitlines()) == 1
    code, out = run_cli("run", str(tmp_path / "t.parquet"), "--target", "twin", "--profile", "h100-llama-3.1-8b",
                        "--plan", str(short), "--max-loras", "2", "--out", str(tmp_path / "r.parquet"))
    assert code == 2 and "--max-loras does not apply with --plan" in out
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"gpus": [{"name": "g0", "adapters": ["a1", "a2"]},
                                        {"name": "g1", "adapters": ["a3", "a4"], "max_loras": 512, "max_lora_rank": 256}]}))
    code, out = run_cli("run", str(tmp_path / "t.parquet"), "--target", "twin", "--profile", "h100-llama-3.1-8b",
                        "--plan", str(big), "--out", str(tmp_path / "r.parquet"))
    assert code == 2 and "g1: does not fit its memory" in out and len(out.strip().splitlines()) == 1
