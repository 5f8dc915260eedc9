"""`replay`: run a trace against a target, report results, compare two runs."""

from __future__ import annotations

import click

from tracekit import __version__
from tracekit.cliutil import LazyGroup


@click.group(
    cls=LazyGroup,
    lazy={
        "run": "replay.run_cmd:run_cmd",
        "report": "replay.report:report_cmd",
        "compare": "replay.compare:compare_cmd",
    },
)
@click.version_option(__version__, prog_name="replay")
def main() -> None:
    """Replay traces open-loop against vLLM or the twin; report and compare results."""
