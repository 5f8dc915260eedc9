"""Serving defaults: what a profile's server ran with, else vLLM 0.32's own for its GPU."""

from __future__ import annotations

import pytest

from twin.config import ServingConfig, server_defaults, vllm_batch_defaults
from twin.profile import load_profile


@pytest.mark.parametrize(
    "mem,gpu,want",
    [
        (80.0, "H100", (1024, 8192)),
        (141.0, "NVIDIA H200", (1024, 8192)),
        (80.0, "NVIDIA A100-SXM4-80GB", (256, 2048)),  # vLLM keeps A100s small (its PR 17885)
        (64.0, "H100", (256, 2048)),  # MareNostrum 5's 64 GiB H100s: under the 70 GiB line
        (70.0, "L40", (1024, 8192)),
        (69.9, "L40", (256, 2048)),
        (180.0, "B200", (1024, 16384)),
        (None, "", (256, 2048)),  # memory unknown, as vLLM when it cannot query the device
    ],
)
def test_vllm_032_api_server_batch_defaults(mem, gpu, want) -> None:
    assert vllm_batch_defaults(mem, gpu) == want


def test_a_profile_records_its_server_else_gets_vllms_defaults_for_its_gpu() -> None:
    shipped = load_profile("h100-llama-3.1-8b")
    d = server_defaults(shipped.data)
    assert (d["max_num_seqs"], d["max_num_batched_tokens"]) == (2048, 2048)  # as the paper ran them
    assert d["defaults_from"] == "the profile's server (vLLM 0.8.5)"
    bare = {"name": "x", "hardware": {"gpu": "H100", "gpu_memory_gib": 80}}
    d = server_defaults(bare)
    assert (d["max_num_seqs"], d["max_num_batched_tokens"]) == (1024, 8192)
    assert d["defaults_from"] == "vLLM 0.32.0's API-server defaults for H100 with 80 GiB"
    half = dict(bare, server={"max_num_seqs": 512})
    d = server_defaults(half)
    assert (d["max_num_seqs"], d["max_num_batched_tokens"]) == (512, 8192)
    assert "(max_num_batched_tokens; the rest from the profile's server)" in d["defaults_from"]
    cpu = {"name": "c", "hardware": {"device": "as captured"}}
    assert (server_defaults(cpu)["max_num_seqs"], server_defaults(cpu)["max_num_batched_tokens"]) == (256, 2048)
    # ServingConfig.for_profile takes them; a flag overrides.
    cfg = ServingConfig.for_profile(bare, max_loras=4)
    assert (cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_loras) == (1024, 8192, 4)
    assert ServingConfig.for_profile(bare, max_num_seqs=64).max_num_seqs == 64
