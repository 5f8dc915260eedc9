"""The shared real-vLLM test support: the server command line and environment (no vLLM run)."""

from __future__ import annotations

from pathlib import Path

import pytest
from vllm_support import VllmServer, build_model, native_dtype


def test_server_command_follows_the_cpu_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACEKIT_STEPS_DIR", "/leaked/from/parent")
    srv = VllmServer(tmp_path / "m", {"a1": tmp_path / "l1", "a2": tmp_path / "l2"}, max_loras=1,
                     max_cpu_loras=2, max_lora_rank=16, max_num_seqs=4, port=12345,
                     env={"EXTRA": "1"}, extra_args=["--no-enable-prefix-caching"])
    cmd = srv.command()
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cmd)
    for flag in ("--enable-lora", "--max-loras 1", "--max-cpu-loras 2", "--max-lora-rank 16", "--max-num-seqs 4",
                 "--port 12345", f"--dtype {native_dtype()}", "--enforce-eager", "--no-enable-prefix-caching",
                 f"a1={tmp_path / 'l1'}"):
        assert flag in joined
    env = srv.environment()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["HF_HUB_OFFLINE"] == "1" and env["EXTRA"] == "1"
    assert env["TMPDIR"] == str(srv._tmp)  # vllm_dist_* files land in a folder stop() removes
    assert "TRACEKIT_STEPS_DIR" not in env  # capture is opt-in per server
    srv.stop()  # never started: only removes its temp folder
    assert not srv._tmp.exists()
    plain = VllmServer(tmp_path / "m")
    assert "--enable-lora" not in plain.command()
    plain.stop()


def test_build_model_rejects_unknown_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size must be one of"):
        build_model(tmp_path, size="huge")


def test_dtype_is_bfloat16_only_with_native_bf16() -> None:
    avx512 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n"
    amx = "flags\t\t: fpu avx2 amx_bf16 amx_tile\n"
    avx2 = "flags\t\t: fpu sse2 avx avx2 fma avx512f\n"  # AVX-512 without its bf16 extension
    assert native_dtype(avx512) == native_dtype(amx) == "bfloat16"
    assert native_dtype(avx2) == native_dtype("") == "float32"
    srv = VllmServer("/m", dtype="float32")
    assert "--dtype float32" in " ".join(srv.command())
    srv.stop()
