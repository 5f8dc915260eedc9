"""`tracekit`: synthesise, import, inspect and capture traces."""

from __future__ import annotations

import click

from tracekit import __version__
from tracekit.cliutil import LazyGroup


@click.group(
    cls=LazyGroup,
    lazy={
        "synth": "tracekit.synth:synth_cmd",
        "import": "tracekit.importers:import_cmd",
        "inspect": "tracekit.inspect:inspect_cmd",
        "proxy": "tracekit.capture.proxy:proxy_cmd",
    },
)
@click.version_option(__version__, prog_name="tracekit")
def main() -> None:
    """Capture, import, synthesise and inspect LoRA serving traces (Parquet)."""
