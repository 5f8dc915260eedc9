"""`twin`: simulate vLLM serving a trace, and calibrate profiles."""

from __future__ import annotations

import click

from tracekit import __version__
from tracekit.cliutil import LazyGroup


@click.group(
    cls=LazyGroup,
    lazy={
        "run": "twin.run_cmd:run_cmd",
        "calibrate": "twin.calibrate:calibrate_cmd",
        "profiles": "twin.profile:profiles_cmd",
    },
)
@click.version_option(__version__, prog_name="twin")
def main() -> None:
    """Simulate vLLM serving with LoRA adapters; calibrate step-time profiles."""
