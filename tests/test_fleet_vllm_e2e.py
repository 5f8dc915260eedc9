"""End to end on two real vLLM servers (CPU): a fleet plan of four adapters over two
servers, replayed with `replay run --url A,B --plan` (placement, then least-loaded),
then the same plan on the fleet twin, then `replay compare` per replica.

The load is derived from the servers' measured speed on this machine (a burst timed on
each), so the run stays short and unsaturated on a slow CPU as on a fast one."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import vllm_support
from click.testing import CliRunner

from replay.cli import main as replay_main
from tracekit.schema import new_context, read, write

pytestmark = pytest.mark.vllm

RANKS = {"a1": 8, "a2": 16, "a3": 8, "a4": 16}
PLAN = {"gpus": [
    {"name": "left", "adapters": ["a1", "a2"], "max_loras": 2, "max_cpu_loras": 2, "max_lora_rank": 16, "max_num_seqs": 8},
    {"name": "right", "adapters": ["a3", "a4"], "max_loras": 2, "max_cpu_loras": 2, "max_lora_rank": 16, "max_num_seqs": 8},
]}


def measured_req_s(srv: vllm_support.VllmServer, adapter: str, n: int = 16) -> float:
    """Requests per second the server completes for a burst of `n` short requests."""
    body = {"model": adapter, "prompt": list(range(100, 132)), "max_tokens": 12, "ignore_eos": True}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as ex:
        list(ex.map(lambda _: srv.post_json("/v1/completions", body, timeout=120), range(n)))
    return n / (time.perf_counter() - t0)


def make_trace(path: Path, n: int, rate: float, seed: int = 7) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    names = list(RANKS)
    df = pl.DataFrame({
        "request_id": [f"f{i:04d}" for i in range(n)],
        "arrival_s": np.cumsum(rng.exponential(1 / rate, n)),
        "adapter": [names[i] for i in rng.integers(0, len(names), n)],
        "prompt_tokens": rng.integers(8, 48, n).astype(np.int32),
        "output_tokens": rng.integers(2, 16, n).astype(np.int32),
    })
    write(path, df, "trace", new_context(source="test", adapters={a: {"rank": r, "path": None} for a, r in RANKS.items()}))
    return df


def test_two_real_servers_behind_a_router_then_the_fleet_twin(tmp_path: Path, tiny_model: Path,
                                                               tiny_adapters: dict[str, Path]) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(PLAN))
    servers = [vllm_support.VllmServer(tiny_model, {a: tiny_adapters[a] for a in g["adapters"]}, max_loras=2,
                                       max_cpu_loras=2, max_num_seqs=8) for g in PLAN["gpus"]]
    errors: list[BaseException] = []

    def start(s: vllm_support.VllmServer) -> None:
        try:
            s.start()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        left, right = servers
        speed = min(measured_req_s(left, "a1"), measured_req_s(right, "a3"))
        # Half of what the slower server completes in a burst, over both: unsaturated.
        rate = max(2.0, 0.5 * speed)
        df = make_trace(tmp_path / "trace.parquet", n=int(rate * 6) + 20, rate=rate)
        urls = f"{left.url},{right.url}"
        loras = tmp_path / "loras"  # for least-loaded: a server may be sent any adapter
        loras.mkdir()
        for a in RANKS:
            (loras / a).symlink_to(tiny_adapters[a])
        for router in ("placement", "least-loaded"):
            res = CliRunner().invoke(replay_main, [
                "run", str(tmp_path / "trace.parquet"), "--target", "vllm", "--url", urls, "--plan", str(plan),
                "--router", router, "--lora-dir", str(loras), "--request-timeout", "60", "--no-progress",
                "--out", str(tmp_path / f"real-{router}.parquet")])
            assert res.exit_code == 0, res.output + left.log_tail() + right.log_tail()
    finally:
        for s in servers:
            s.stop()

    real, meta = read(tmp_path / "real-placement.parquet", "results")
    assert real.height == df.height and (real["status"] == "ok").all(), real.filter(pl.col("status") != "ok").head()
    want = {"a1": "left", "a2": "left", "a3": "right", "a4": "right"}
    assert real["replica"].to_list() == [want[a] for a in real["adapter"].to_list()]
    real = real.join(df.select("request_id", pl.col("output_tokens").alias("want")), on="request_id")
    assert (real["generated_tokens"] == real["want"]).all()
    assert [g["name"] for g in meta.context["fleet"]["gpus"]] == ["left", "right"]

    # least-loaded over all servers: each server registered the adapters it lacked, both
    # took requests, and every request went to a server with the fewest outstanding ones.
    # The share each gets depends on the servers' speed on this machine, so the rule is
    # checked instead: outstanding counts rebuilt from the results (sent at dispatch_s,
    # done at end_s), with events within 50 ms of a send counted either way.
    ll, meta_ll = read(tmp_path / "real-least-loaded.parquet", "results")
    assert (ll["status"] == "ok").all(), ll.filter(pl.col("status") != "ok").select("request_id", "adapter", "replica",
                                                                                    "status", "error").rows()
    counts = dict(ll["replica"].value_counts().iter_rows())
    assert set(counts) == {"left", "right"}, counts
    assert _least_loaded_violations(ll) == [], counts
    assert set(meta_ll.context["fleet"]["gpus"][0]["adapters_loaded"]) == {"a3", "a4"}

    res = CliRunner().invoke(replay_main, ["run", str(tmp_path / "trace.parquet"), "--target", "twin",
                                           "--profile", "h100-llama-3.1-8b", "--plan", str(plan),
                                           "--out", str(tmp_path / "twin.parquet")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(replay_main, ["compare", str(tmp_path / "real-placement.parquet"),
                                           str(tmp_path / "twin.parquet"), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output.splitlines()[0])
    pr = d["per_replica"]
    assert [r["replica"] for r in pr["replicas"]] == ["left", "right"] and pr["same_replica_frac"] == 1.0
    for r in pr["replicas"]:
        assert r["completed_a"] == r["completed_b"] == r["requests_a"]


def _least_loaded_violations(res: pl.DataFrame, slack_s: float = 0.05) -> list[str]:
    """Requests sent to a replica that surely had more outstanding requests than another."""
    sent = res["dispatch_s"].to_numpy()
    done = res["end_s"].to_numpy()
    rep = res["replica"].to_list()
    names = sorted(set(rep))
    bad = []
    for i, t in enumerate(sent):
        lo, hi = {}, {}
        for r in names:
            mine = [j for j in range(len(rep)) if rep[j] == r and j != i]
            # surely outstanding: sent before and done after, both clear of the slack
            lo[r] = sum(1 for j in mine if sent[j] < t - slack_s and done[j] > t + slack_s)
            hi[r] = sum(1 for j in mine if sent[j] < t + slack_s and done[j] > t - slack_s)
        if lo[rep[i]] > min(hi[r] for r in names if r != rep[i]):
            bad.append(f"request {i} at {t:.3f}s -> {rep[i]} (outstanding >= {lo}, <= {hi})")
    return bad
