"""Shared pytest fixtures: a real vLLM model and adapters, built offline once per session.

Tests marked `vllm` need `.venv-vllm` (vLLM on the CPU). Without it they are skipped
with a reason; CI installs it, so there they run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vllm_support  # noqa: E402

# Four adapters of two ranks: more than the usual max_loras=2, so slots are contended.
TEST_ADAPTER_RANKS = {"a1": 8, "a2": 16, "a3": 8, "a4": 16}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if vllm_support.vllm_available():
        return
    skip = pytest.mark.skip(reason=f"vLLM environment not installed ({vllm_support.VLLM_PYTHON}); run `make setup-vllm`")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vllm_cache_dir() -> Path:
    """Where built models live across sessions (tests/.cache, or $TRACEKIT_TEST_CACHE)."""
    vllm_support.DEFAULT_CACHE.mkdir(parents=True, exist_ok=True)
    return vllm_support.DEFAULT_CACHE


@pytest.fixture(scope="session")
def tiny_model(vllm_cache_dir: Path) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer (vocab 2048)."""
    return vllm_support.build_model(vllm_cache_dir, size="tiny")


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model: Path, vllm_cache_dir: Path) -> dict[str, Path]:
    """Four LoRA adapters for `tiny_model`: name -> folder (ranks in TEST_ADAPTER_RANKS)."""
    return vllm_support.build_adapters(tiny_model, TEST_ADAPTER_RANKS, vllm_cache_dir)


@pytest.fixture(scope="session")
def medium_model(vllm_cache_dir: Path) -> Path:
    """A ~30M-parameter random Llama: step time grows with batch and tokens."""
    return vllm_support.build_model(vllm_cache_dir, size="medium")


@pytest.fixture
def on_source_twin(request: pytest.FixtureRequest) -> bool:
    """For a test that patches the twin's internals (a spy on a method): a compiled class
    takes no patch, so with the compiled twin (`twin.NATIVE`) the test runs in a pytest
    subprocess on the twin's source (TWIN_PURE_PYTHON=1), must pass there, and the fixture
    returns True (the caller returns). False: this process runs the source already."""
    import os
    import subprocess

    import twin

    if twin.NATIVE != "compiled":
        return False
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
                       cwd=request.config.rootpath, env={**os.environ, "TWIN_PURE_PYTHON": "1"},
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0 and " passed" in r.stdout, f"on the source twin:\n{r.stdout[-4000:]}{r.stderr[-2000:]}"
    return True
