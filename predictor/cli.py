"""`predictor`: build datasets from twin sweeps, train, recommend."""

from __future__ import annotations

import click

from tracekit import __version__
from tracekit.cliutil import LazyGroup


@click.group(
    cls=LazyGroup,
    lazy={
        "features": "predictor.features:features_cmd",
        "dataset": "predictor.dataset:dataset_cmd",
        "train": "predictor.train:train_cmd",
        "recommend": "predictor.recommend:recommend_cmd",
        "plan": "predictor.fleet:plan_cmd",
    },
)
@click.version_option(__version__, prog_name="predictor")
def main() -> None:
    """Recommend max_cpu_loras / max_loras for a trace, learned from twin sweeps."""
