"""`predictor dataset --executor ray`: the same sweep on a local Ray cluster gives the
same dataset as the local executor, and resumes the same way."""

from __future__ import annotations

import json
import os
from pathlib import Path

import predictor_toy
import pytest

from predictor import dataset as D
from predictor import spec as S

ray = pytest.importorskip("ray", reason="Ray not installed (pip install 'lora-tracekit[ray]')")

GRID = "rates=0.4/0.05/0.0125,1.6/0.4/0.1;ranks=8/16/32;max_loras=16,32;max_cpu_loras=16,32,64;duration=60"
SIM = "predictor_toy:simulate"


@pytest.fixture(scope="module")
def local_ray():
    tests_dir = str(Path(__file__).resolve().parent)
    path = os.pathsep.join([tests_dir, str(Path(tests_dir).parent), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_sweep_matches_local(tmp_path, local_ray) -> None:
    prof = tmp_path / "toy.json"
    prof.write_text(json.dumps(predictor_toy.TOY_PROFILE))
    spec = S.load(GRID)
    a, _ = D.sweep(spec, str(prof), tmp_path / "local.parquet", simulator=SIM, progress=False)
    b, ctx = D.sweep(spec, str(prof), tmp_path / "ray.parquet", executor="ray", simulator=SIM, progress=False)
    assert ctx["executor"] == "ray" and ctx["cells_run"] == len(spec.cells())
    cols = ["cell_key", "throughput_tok_s", "served_frac", "is_best"]
    assert a.sort("cell_key").select(cols).equals(b.sort("cell_key").select(cols))
    # Finished: a second Ray run has nothing to do.
    _, ctx = D.sweep(spec, str(prof), tmp_path / "ray.parquet", executor="ray", simulator=SIM, progress=False)
    assert ctx["cells_run"] == 0
