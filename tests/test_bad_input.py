"""Every console script on each bad file: one `error: ...` line naming the file, exit 2,
no traceback; a trace with bad values gets the same line from every command that reads
a trace. The console scripts come from the package's own metadata, so a new script or
subcommand cannot miss the matrix (tests/bad_inputs.py)."""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from importlib.metadata import entry_points
from pathlib import Path

import click
import pytest
from bad_inputs import (
    COMMANDS,
    READS_NO_FILE,
    TRACE_READERS,
    bad_files,
    bad_profiles,
    good_inputs,
    pairs,
)
from click.testing import CliRunner

VALUE_ERRORS = ("negative-arrival", "nan-arrival", "zero-prompt", "zero-output", "duplicate-ids", "null-id", "bad-part")


def scripts() -> dict[str, click.Command]:
    eps = [ep for ep in entry_points(group="console_scripts") if ep.value.split(".")[0] in {"tracekit", "twin", "replay", "predictor"}]
    return {ep.name: ep.load() for ep in eps}


def leaf_commands(group: click.Command, words: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if not isinstance(group, click.Group):
        return [words]
    ctx = click.Context(group)
    out = []
    for name in group.list_commands(ctx):
        out += leaf_commands(group.get_command(ctx, name), (*words, name))
    return out


def test_the_matrix_covers_every_console_script_and_subcommand() -> None:
    found = {(script, words) for script, cmd in scripts().items() for words in leaf_commands(cmd)}
    assert {s for s, _ in found} == {"tracekit", "twin", "replay", "predictor"}
    covered = {(script, words) for script, words, _, _ in COMMANDS} | READS_NO_FILE
    assert found == covered, f"not in tests/bad_inputs.py: {sorted(found - covered)}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path], dict[str, Path], dict[str, Path]]:
    d = tmp_path_factory.mktemp("bad")
    return d, bad_files(d / "files"), bad_profiles(d / "profiles"), good_inputs(d / "good")


def test_every_command_gives_one_line_and_exit_2_on_every_bad_file(world) -> None:
    d, bad, profiles, good = world
    mains = scripts()
    tried, clean, problems = 0, 0, []
    lines: dict[str, dict[str, str]] = defaultdict(dict)
    for script, words, slot, name, argv in pairs(bad, profiles):
        f = (profiles if slot == "profile" else bad)[name]
        out = d / "out" / f"{script}-{'-'.join(words)}-{name}"
        out.mkdir(parents=True, exist_ok=True)
        res = CliRunner().invoke(mains[script], argv(f, out, good))
        tried += 1
        err = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("note: ")]
        ok = (res.exit_code == 2 and isinstance(res.exception, SystemExit) and len(err) == 1
              and err[0].startswith("error: ") and "Traceback" not in res.output and f.name in err[0])
        if ok:
            clean += 1
            if (script, words) in TRACE_READERS and slot == "trace":
                lines[name][f"{script} {' '.join(words)}"] = err[0]
        else:
            problems.append(f"{script} {' '.join(words)} <- {name}: exit {res.exit_code}, stderr {res.stderr[-300:]!r}"
                            + (f", exception {res.exception!r}" if not isinstance(res.exception, SystemExit) else ""))
    print(f"\n(command, bad file) pairs tried: {tried}; one error line naming the file and exit 2: {clean}")
    assert not problems, "\n".join(problems)
    assert tried >= 250
    # A bad value is one check (tracekit.schema.check_trace): the same line from every reader.
    for name in VALUE_ERRORS:
        assert len(lines[name]) == len(TRACE_READERS), (name, lines[name])
        assert len(set(lines[name].values())) == 1, (name, lines[name])


def test_the_installed_scripts_do_the_same(world) -> None:
    """The console scripts as a user runs them (separate processes), one bad file each."""
    d, bad, _, _ = world
    bindir = Path(sys.executable).parent
    for script, argv in (("tracekit", ["inspect", str(bad["negative-arrival"])]),
                         ("twin", ["run", str(bad["duplicate-ids"]), "--profile", "h100-llama-3.1-8b", "--out",
                                   str(d / "x.parquet")]),
                         ("replay", ["report", str(bad["csv"])]),
                         ("predictor", ["features", str(bad["plain-parquet"])])):
        p = subprocess.run([str(bindir / script), *argv], capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and p.stdout == "", (script, p.stdout, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("error: "), (script, p.stderr)
