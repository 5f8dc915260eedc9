"""Bad input for every console script: the files, the commands that read files, and
how each takes one. Shared by tests/test_bad_input.py (in process, through the console
scripts' entry points) and benchmarks/bad_input.py (the installed scripts, as processes).

Every (command, bad file) pair must give exactly one `error: ...` line on stderr that
names the file, exit code 2, and no traceback. Traces with bad values must give the
same line from every command that reads a trace."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tracekit import schema

PROFILE = "h100-llama-3.1-8b"


def _trace(n: int = 6) -> pa.Table:
    return pa.table({
        "request_id": [f"r{i}" for i in range(n)],
        "arrival_s": pa.array(np.linspace(0.0, 2.0, n)),
        "adapter": ["lora-0000" if i % 2 else None for i in range(n)],
        "prompt_tokens": pa.array([16 + i for i in range(n)], pa.int32()),
        "output_tokens": pa.array([4 + i for i in range(n)], pa.int32()),
    })


def _raw(path: Path, table: pa.Table, kind: str = "trace", version: str = "1", context: str = "{}") -> Path:
    md = {b"tracekit.kind": kind.encode(), b"tracekit.schema": version.encode(), b"tracekit.context": context.encode()}
    pq.write_table(table.replace_schema_metadata(md), path)
    return path


def _set(t: pa.Table, col: str, values: list) -> pa.Table:
    i = t.schema.get_field_index(col)
    return t.set_column(i, col, pa.array(values, t.schema.field(i).type if col != "prompt_tokens" else None))


def _steps(path: Path) -> Path:
    n = 3
    t = pa.table({
        "step": pa.array(range(n), pa.int64()), "t_s": [0.1 * i for i in range(n)], "duration_s": [0.05] * n,
        **{c: pa.array([1] * n, pa.int32()) for c in ("num_running", "num_waiting", "prefill_reqs", "prefill_tokens",
                                                      "decode_reqs", "decode_tokens", "num_preempted", "adapter_loads")},
        "active_adapters": pa.array([["a"]] * n, pa.list_(pa.string())), "kv_usage": [0.1] * n,
    })
    return schema.write(path, t, "steps")


def bad_files(d: Path) -> dict[str, Path]:
    """Files no command should accept as a trace (some are fine for a command that
    reads another kind: see `valid_for`)."""
    d.mkdir(parents=True, exist_ok=True)
    t = _trace()
    out: dict[str, Path] = {"missing": d / "no-such-file.parquet"}
    (d / "empty-dir").mkdir(exist_ok=True)
    out["empty-dir"] = d / "empty-dir"
    out["empty-file"] = d / "empty.parquet"
    out["empty-file"].write_bytes(b"")
    out["binary"] = d / "random.bin"
    out["binary"].write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    out["csv"] = d / "trace.csv"
    out["csv"].write_text("request_id,arrival_s,adapter,prompt_tokens,output_tokens\nr0,0.0,,16,4\nr1,0.5,lora-0000,17,5\n")
    out["jsonl"] = d / "trace.jsonl"
    out["jsonl"].write_text('{"request_id": "r0", "arrival_s": 0.0, "prompt_tokens": 16, "output_tokens": 4}\n')
    out["plain-parquet"] = d / "plain.parquet"
    pq.write_table(t, out["plain-parquet"])
    out["bad-context"] = _raw(d / "bad-context.parquet", t, context="{not json")
    out["newer-schema"] = _raw(d / "newer-schema.parquet", t, version="99")
    out["unknown-kind"] = _raw(d / "unknown-kind.parquet", t, kind="logs")
    out["negative-arrival"] = _raw(d / "negative-arrival.parquet", _set(t, "arrival_s", [0.0, 0.4, -1.0, 1.2, 1.6, 2.0]))
    out["nan-arrival"] = _raw(d / "nan-arrival.parquet", _set(t, "arrival_s", [0.0, 0.4, 0.8, float("nan"), 1.6, 2.0]))
    out["zero-prompt"] = _raw(d / "zero-prompt.parquet", _set(t, "prompt_tokens", [16, 17, 0, 19, 20, 21]))
    out["zero-output"] = _raw(d / "zero-output.parquet", _set(t, "output_tokens", [4, 5, 6, 7, 8, 0]))
    out["duplicate-ids"] = _raw(d / "duplicate-ids.parquet", _set(t, "request_id", ["a", "b", "c", "b", "e", "f"]))
    out["null-id"] = _raw(d / "null-id.parquet", _set(t, "request_id", ["a", None, "c", "d", "e", "f"]))
    out["wrong-type"] = _raw(d / "wrong-type.parquet", _set(t, "prompt_tokens", ["a", "b", "c", "d", "e", "f"]))
    out["missing-column"] = _raw(d / "missing-column.parquet", t.drop_columns(["output_tokens"]))
    parts = d / "bad-part"
    parts.mkdir(exist_ok=True)
    _raw(parts / "part-0.parquet", t)
    _raw(parts / "part-1.parquet", _set(_set(t, "request_id", [f"s{i}" for i in range(6)]), "output_tokens",
                                        [4, 5, 0, 7, 8, 9]))
    out["bad-part"] = parts
    out["steps-file"] = _steps(d / "steps.parquet")
    return out


def bad_profiles(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {"missing-profile": d / "no-such-profile.json"}
    for name, text in (("empty-profile", "{}"), ("not-json-profile", "{not json"), ("list-profile", "[]"),
                       ("bad-section-profile", json.dumps({"name": "x", "step_time": 5})),
                       ("bad-intake-profile", json.dumps({"name": "x", "step_time": {"kind": "linear", "coef": {}},
                                                          "request_intake": -1}))):
        (d / f"{name}.json").write_text(text)
        out[name] = d / f"{name}.json"
    out["parquet-profile"] = d / "profile.json"
    pq.write_table(_trace(), out["parquet-profile"])
    return out


def good_inputs(d: Path) -> dict[str, Path]:
    """Valid inputs for the other slots of a command (e.g. compare's second file)."""
    from twin.api import ServingConfig, simulate

    d.mkdir(parents=True, exist_ok=True)
    trace = schema.write(d / "good-trace.parquet", _trace(), "trace", {"window_s": 2.0})
    df, meta = schema.read_trace(trace)
    res = simulate(df, PROFILE, ServingConfig(max_loras=1, max_lora_rank=16), trace_context=meta.context)
    return {"trace": trace, "results": schema.write(d / "good-results.parquet", res.results, "results", res.context)}


Argv = Callable[[Path, Path, dict[str, Path]], list[str]]

# (script, subcommand words, slot, argv builder(bad, out_dir, good)).
COMMANDS: list[tuple[str, tuple[str, ...], str, Argv]] = [
    ("tracekit", ("inspect",), "trace", lambda f, o, g: ["inspect", str(f)]),
    ("tracekit", ("import", "table"), "table", lambda f, o, g: ["import", "table", str(f), "--out", str(o / "t.parquet")]),
    ("tracekit", ("import", "azure"), "table",
     lambda f, o, g: ["import", "azure", str(f), "--adapters", "2", "--out", str(o / "t.parquet")]),
    ("tracekit", ("import", "burstgpt"), "table",
     lambda f, o, g: ["import", "burstgpt", str(f), "--adapters", "2", "--out", str(o / "t.parquet")]),
    ("tracekit", ("import", "mooncake"), "table",
     lambda f, o, g: ["import", "mooncake", str(f), "--adapters", "2", "--out", str(o / "t.parquet")]),
    ("tracekit", ("synth",), "lengths",
     lambda f, o, g: ["synth", "--adapters", "2", "--rates", "1", "--window", "10", "--lengths", f"file:{f}",
                      "--out", str(o / "t.parquet")]),
    ("twin", ("run",), "trace", lambda f, o, g: ["run", str(f), "--profile", PROFILE, "--out", str(o / "r.parquet")]),
    ("twin", ("run",), "profile", lambda f, o, g: ["run", str(g["trace"]), "--profile", str(f), "--out", str(o / "r.parquet")]),
    ("twin", ("calibrate",), "steps", lambda f, o, g: ["calibrate", str(f), "--out", str(o / "p.json")]),
    ("replay", ("run",), "trace",
     lambda f, o, g: ["run", str(f), "--target", "twin", "--profile", PROFILE, "--out", str(o / "r.parquet")]),
    ("replay", ("run",), "profile",
     lambda f, o, g: ["run", str(g["trace"]), "--target", "twin", "--profile", str(f), "--out", str(o / "r.parquet")]),
    ("replay", ("report",), "results", lambda f, o, g: ["report", str(f)]),
    ("replay", ("compare",), "results", lambda f, o, g: ["compare", str(f), str(g["results"])]),
    ("replay", ("compare",), "results", lambda f, o, g: ["compare", str(g["results"]), str(f)]),
    ("predictor", ("features",), "trace", lambda f, o, g: ["features", str(f)]),
    ("predictor", ("recommend",), "trace", lambda f, o, g: ["recommend", str(f), "--profile", PROFILE]),
    ("predictor", ("recommend",), "profile", lambda f, o, g: ["recommend", str(g["trace"]), "--profile", str(f)]),
    ("predictor", ("plan",), "trace", lambda f, o, g: ["plan", str(f), "--profile", PROFILE, "--out", str(o / "p.json")]),
    ("predictor", ("plan",), "profile",
     lambda f, o, g: ["plan", str(g["trace"]), "--profile", str(f), "--out", str(o / "p.json")]),
    ("predictor", ("dataset",), "profile",
     lambda f, o, g: ["dataset", "--profile", str(f), "--workloads", "adapters=4;rates=0.1", "--out", str(o / "d.parquet")]),
    ("predictor", ("train",), "dataset", lambda f, o, g: ["train", str(f), "--out", str(o / "m.json")]),
]
# Subcommands that read no input file (a server, a listing): not in the matrix.
READS_NO_FILE = {("tracekit", ("proxy",)), ("twin", ("profiles",))}

# Files a command accepts as valid input, so not bad there: a CSV, JSONL or plain
# Parquet table is what `import table` is for (a Parquet file's own metadata, broken or
# not, is no concern of it: it reads the columns); any table with the two length
# columns serves `synth --lengths file:`; `inspect` and `twin calibrate` read steps.
VALID_FOR: dict[tuple[str, ...], set[str]] = {
    ("import", "table"): {"csv", "jsonl", "plain-parquet", "bad-context", "newer-schema", "unknown-kind"},
    ("synth",): {"csv", "plain-parquet"},
    ("inspect",): {"steps-file"},
    ("calibrate",): {"steps-file"},
}
# The commands that read a trace: a trace with bad values gets the same line from each.
TRACE_READERS = {("tracekit", ("inspect",)), ("twin", ("run",)), ("replay", ("run",)), ("predictor", ("features",)),
                 ("predictor", ("recommend",)), ("predictor", ("plan",))}


def pairs(bad: dict[str, Path], profiles: dict[str, Path]) -> list[tuple[str, tuple[str, ...], str, str, Argv]]:
    """Every (script, command, slot, bad file name, argv builder) to try."""
    out = []
    for script, words, slot, argv in COMMANDS:
        files = profiles if slot == "profile" else bad
        for name in files:
            if name not in VALID_FOR.get(words, set()):
                out.append((script, words, slot, name, argv))
    return out
