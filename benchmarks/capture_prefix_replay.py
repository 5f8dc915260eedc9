"""Prefix sharing survives capture and replay (issue 10, item 4), on a real vLLM server.

1. `tracekit synth --turns 4 --system-prompts 2:256` writes a multi-turn chat trace over
   4 adapters (token ids; prompts grow turn by turn and open with shared system prompts).
2. Original: a vLLM server with prefix caching (its default) and the step plugin; the
   trace is replayed through `tracekit proxy`, which captures each request with its
   `prefix_hashes` (no token ids kept). In the `chat` variant the same prompts are sent
   as chat messages of text (the server's /detokenize of the ids), so the proxy has the server
   tokenize them (`/tokenize`, chat template applied) to hash them.
3. Replay: a fresh server (empty prefix cache), the same configuration; `replay run` of
   the capture rebuilds token ids from the hashes (`tracekit.prefix.tokens_from_block_hashes`).
4. The prefix-cache hit share of each run from its captured steps: cached tokens /
   (cached + prefill tokens) over all steps (the plugin's `cached_tokens`: what requests
   entering a batch found in the cache). Also from vLLM's own counters
   (`vllm:prefix_cache_hits` / `queries`) and from the proxy rows' `cached_tokens`.
Goal: the replay's share within 2 points of the original's.

Also measured: the real server's cost of one `/tokenize` call (median latency, and the
API server's CPU per call), the route text and chat prompts take.

Run: flock /tmp/tracekit-heavy.lock .venv/bin/python benchmarks/capture_prefix_replay.py [--variant ids|chat]
Writes benchmarks/results/capture_prefix_replay.{md,json} (a variant keeps the other's last results).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from capture_proxy_overhead import cpu_seconds, save_part  # noqa: E402
from vllm_support import VllmServer, build_adapters, build_model, cli, start_proxy  # noqa: E402

from tracekit import schema  # noqa: E402

RESULTS = HERE / "results"
ADAPTER_RANKS = {"a1": 8, "a2": 16}
SERVER = dict(max_loras=4, max_cpu_loras=8, max_num_seqs=16, max_model_len=2048)


def prefix_counters(url: str) -> tuple[float, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    got = {"hits": 0.0, "queries": 0.0}
    for line in text.splitlines():
        for k in got:
            if line.startswith(f"vllm:prefix_cache_{k}_total"):
                got[k] += float(line.rsplit(" ", 1)[1])
    return got["hits"], got["queries"]


def steps_share(steps_dir: Path) -> dict[str, float]:
    df, _ = schema.read(steps_dir, "steps")
    cached, prefill = int(df["cached_tokens"].sum()), int(df["prefill_tokens"].sum())
    return {"steps": df.height, "cached_tokens": cached, "prefill_tokens": prefill,
            "share": cached / (cached + prefill) if cached + prefill else 0.0}


def chat_texts(url: str, trace: Any) -> list[str]:
    """Each prompt as text: the server's own /detokenize of its token ids (so that the chat
    template and the tokenizer see ordinary text of about the same length)."""
    out = []
    for ids in trace["prompt_token_ids"].to_list():
        body = json.dumps({"tokens": ids}).encode()
        req = urllib.request.Request(url + "/detokenize", data=body, headers={"Content-Type": "application/json"})
        out.append(json.loads(urllib.request.urlopen(req, timeout=60).read())["prompt"])
    return out


async def send_chat(url: str, trace: Any, texts: list[str], base: str) -> None:
    """The trace's prompts as chat messages of text, each at its arrival time."""
    import aiohttp

    start = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def one(r: dict[str, Any], text: str) -> None:
            await asyncio.sleep(max(0.0, r["arrival_s"] - (time.perf_counter() - start)))
            body = {"model": r["adapter"] or base, "messages": [{"role": "user", "content": text}],
                    "max_tokens": int(r["output_tokens"]), "ignore_eos": True}
            async with s.post(url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200, (await resp.read())[:300]
                await resp.read()

        await asyncio.gather(*(one(r, t) for r, t in zip(trace.iter_rows(named=True), texts, strict=True)))


def tokenize_cost(srv: VllmServer, n: int = 200) -> dict[str, float]:
    """One /tokenize call of a chat of ~300 words: median latency, API server CPU per call."""
    body = json.dumps({"model": "a1", "messages": [{"role": "user", "content": " ".join(f"w{i}" for i in range(300))}]}).encode()
    req = lambda: urllib.request.Request(srv.url + "/tokenize", data=body, headers={"Content-Type": "application/json"})  # noqa: E731
    for _ in range(10):
        urllib.request.urlopen(req()).read()
    assert srv.proc is not None
    lat = []
    c0 = cpu_seconds(srv.proc.pid)
    for _ in range(n):
        t = time.perf_counter()
        urllib.request.urlopen(req()).read()
        lat.append(time.perf_counter() - t)
    cpu = cpu_seconds(srv.proc.pid) - c0
    return {"calls": n, "median_ms": statistics.median(lat) * 1e3, "api_server_cpu_ms_per_call": cpu / n * 1e3}


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="capture-prefix-"))
    model = build_model(size="tiny")
    built = build_adapters(model, ADAPTER_RANKS)
    trace = work / "trace.parquet"
    cli("tracekit", "synth", "--adapters", "4", "--ranks", "8,16", "--total-rate", str(args.rate), "--duration",
        str(args.duration), "--turns", "4", "--system-prompts", "2:256", "--lengths", "fixed:64,32",
        "--seed", str(args.seed), "--out", str(trace))
    tdf, tmeta = schema.read_trace(trace)
    # The trace's adapters (lora-0000..0003) served by the built adapter of their rank.
    lora_dir = work / "loras"
    lora_dir.mkdir()
    by_rank = {rank: built[name] for name, rank in ADAPTER_RANKS.items()}
    for name, rank in schema.adapter_ranks(tmeta.context).items():
        (lora_dir / name).symlink_to(by_rank[rank])
    extra = ["--enable-prompt-tokens-details"]
    out: dict[str, Any] = {"variant": args.variant, "requests": tdf.height, "prompt_tokens": int(tdf["prompt_tokens"].sum())}

    # The original run, through the proxy.
    with VllmServer(model, built, **SERVER, env={"TRACEKIT_STEPS_DIR": str(work / "steps-orig")},
                    extra_args=extra, log_path=work / "server-orig.log") as srv:
        proxy, url = start_proxy(srv.url, work / "capture")
        try:
            if args.variant == "ids":
                cli("replay", "run", str(trace), "--target", "vllm", "--url", url, "--lora-dir", str(lora_dir),
                    "--out", str(work / "orig.parquet"), "--until-done", "--no-progress")
            else:
                for name in sorted(p.name for p in lora_dir.iterdir()):
                    body = json.dumps({"lora_name": name, "lora_path": str(lora_dir / name)}).encode()
                    urllib.request.urlopen(urllib.request.Request(srv.url + "/v1/load_lora_adapter", data=body, headers={
                        "Content-Type": "application/json"}), timeout=60).read()
                texts = chat_texts(srv.url, tdf)
                asyncio.run(send_chat(url, tdf, texts, srv.served_model_name))
                out["tokenize"] = tokenize_cost(srv)
        finally:
            proxy.send_signal(signal.SIGTERM)
            proxy.wait(timeout=120)
        out["orig_metrics"] = prefix_counters(srv.url)
    cap, cmeta = schema.read(work / "capture", "results")
    out["capture_rows"] = cap.height
    out["capture_ok"] = int((cap["status"] == "ok").sum())
    out["capture_rows_with_hashes"] = int(cap["prefix_hashes"].is_not_null().sum())
    out["prefix_block_tokens"] = cmeta.context.get(schema.CTX_PREFIX_BLOCK_TOKENS)
    out["capture_has_token_ids"] = bool(cap["prompt_token_ids"].is_not_null().any())

    # The replay of the capture on a fresh server.
    with VllmServer(model, built, **SERVER, env={"TRACEKIT_STEPS_DIR": str(work / "steps-replay")},
                    extra_args=extra, log_path=work / "server-replay.log") as srv:
        cli("replay", "run", str(work / "capture"), "--target", "vllm", "--url", srv.url, "--lora-dir", str(lora_dir),
            "--out", str(work / "replay.parquet"), "--until-done", "--no-progress")
        out["replay_metrics"] = prefix_counters(srv.url)
    # Control: the same capture without its hashes (prompts drawn at random), on a fresh server.
    plain = cap.drop("prefix_hashes")
    schema.write(work / "capture-plain.parquet", plain, "results", cmeta.context)
    with VllmServer(model, built, **SERVER, env={"TRACEKIT_STEPS_DIR": str(work / "steps-plain")},
                    extra_args=extra, log_path=work / "server-plain.log") as srv:
        cli("replay", "run", str(work / "capture-plain.parquet"), "--target", "vllm", "--url", srv.url,
            "--lora-dir", str(lora_dir), "--out", str(work / "plain.parquet"), "--until-done", "--no-progress")
    out["control_steps"] = steps_share(work / "steps-plain")
    rep, _ = schema.read(work / "replay.parquet", "results")
    out["replay_ok"] = int((rep["status"] == "ok").sum())
    out["orig_steps"] = steps_share(work / "steps-orig")
    out["replay_steps"] = steps_share(work / "steps-replay")
    out["proxy_cached_share"] = (float(cap["cached_tokens"].sum()) / float(cap["prompt_tokens"].sum())
                                 if cap["cached_tokens"].is_not_null().any() else None)
    shutil.rmtree(work, ignore_errors=True)
    return out


def render(data: dict[str, Any]) -> str:
    lines = ["# Prefix sharing: capture, then replay (real vLLM, CPU)", ""]
    rows = []
    for variant in ("ids", "chat"):
        if variant not in data:
            continue
        d = data[variant]
        m = d["meta"]
        lines.append(f"`{variant}`: `{m['command']}` ({m['date_utc']}); {m['machine']}; server dtype {m['dtype']}.")
        o, r = d["orig_steps"], d["replay_steps"]
        om, rm = d["orig_metrics"], d["replay_metrics"]
        diff = (r["share"] - o["share"]) * 100
        control = f"{d['control_steps']['share'] * 100:.2f}%" if "control_steps" in d else "-"
        rows.append(
            f"| {variant} | {d['requests']} | {d['capture_rows']} ({d['capture_rows_with_hashes']} hashed, "
            f"blocks of {d['prefix_block_tokens']}) | {o['share'] * 100:.2f}% | {r['share'] * 100:.2f}% | **{diff:+.2f}** | "
            f"{om[0] / om[1] * 100 if om[1] else 0:.2f}% / {rm[0] / rm[1] * 100 if rm[1] else 0:.2f}% | "
            f"{(d['proxy_cached_share'] or 0) * 100:.2f}% | {control} |")
    lines += [
        "",
        "Trace: `tracekit synth --adapters 4 --turns 4 --system-prompts 2:256 --lengths fixed:64,32` "
        "(prompts grow over 4 turns, each conversation opens with one of 2 shared 256-token system prompts). "
        "`ids`: sent as token ids; `chat`: the same prompts as text (the server's /detokenize of the ids) in chat "
        "messages, tokenized by the server (`/tokenize`, chat template applied) for the hashes. "
        "The capture keeps no token ids; the replay rebuilds them from `prefix_hashes`.",
        "",
        "| variant | requests | capture rows | hit share, original (steps) | hit share, replay (steps) | "
        "**difference, points** | vLLM counters: original / replay | proxy rows' cached_tokens share (original) | "
        "control: replay without the hashes |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Hit share from steps: the plugin's `cached_tokens` / (`cached_tokens` + `prefill_tokens`) over all steps. "
        "Goal: within 2 points. The control replays the same capture with its `prefix_hashes` dropped (prompts of "
        "the same lengths, drawn at random): the sharing then comes from the hashes alone.",
    ]
    if "chat" in data and data["chat"].get("tokenize"):
        t = data["chat"]["tokenize"]
        lines += ["", f"Cost of the `/tokenize` route on the real server (a chat of 300 words, {t['calls']} calls): "
                  f"median {t['median_ms']:.2f} ms per call, {t['api_server_cpu_ms_per_call']:.2f} ms of the API server's CPU "
                  "per call; the proxy makes the call after the request's answer is complete, up to 4 at a time."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=["ids", "chat"], default="ids")
    ap.add_argument("--rate", type=float, default=4.0)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    save_part(RESULTS, "capture_prefix_replay", args.variant, run(args), render, "capture_prefix_replay.py")


if __name__ == "__main__":
    main()
