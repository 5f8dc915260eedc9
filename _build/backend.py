"""The build backend: setuptools', asking for mypy (its compiler mypyc builds the twin's
step loop, setup.py) only when the build compiles. With `TWIN_PURE_PYTHON=1` pip does not
install mypy into the build environment at all (tens of seconds of every install)."""

from __future__ import annotations

import os

from setuptools import build_meta as _orig
from setuptools.build_meta import *  # noqa: F403 (the backend's other hooks, unchanged)

COMPILER = ["mypy>=2.4"]  # mypyc with librt.vecs (`twin.scheduler.int_vec`)


def _compiler() -> list[str]:
    return [] if os.environ.get("TWIN_PURE_PYTHON") else COMPILER


def get_requires_for_build_wheel(config_settings=None):  # type: ignore[no-untyped-def]
    return _orig.get_requires_for_build_wheel(config_settings) + _compiler()


def get_requires_for_build_editable(config_settings=None):  # type: ignore[no-untyped-def]
    return _orig.get_requires_for_build_editable(config_settings) + _compiler()
