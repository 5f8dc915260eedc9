"""Real vLLM for tests and benchmarks, with no downloads and no GPU.

- `build_model(cache_dir, size)` makes a random Llama and a byte-level BPE tokenizer;
- `build_adapters(model_dir, cache_dir, {name: rank})` makes PEFT LoRA adapters;
- `VllmServer(...)` runs `python -m vllm.entrypoints.openai.api_server` from
  `.venv-vllm` (vLLM, torch and peft live only there), waits for /health, and always
  stops it (SIGTERM, then SIGKILL) and removes its temporary files; its `--dtype` is
  the one this CPU runs natively (`native_dtype`);
- `measure_speed(url, ...)` times the server at hand, so that a test sizes its load,
  windows and timeouts from it (another CPU runs these models several times slower);
- `gauges(url)` reads the server's request gauges from `/metrics`;
- `start_proxy(upstream, out)` starts `tracekit proxy` in front of a server and waits
  for its /health; `hang_up(request_task)` is a client going away; `cli(pkg, *args)` runs
  one of the project's command lines.

Builders run in a `.venv-vllm` subprocess and cache their output: a folder holding a
`.done` marker is reused, so a test session builds each model once.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VLLM_VENV = Path(os.environ.get("TRACEKIT_VLLM_VENV", REPO / ".venv-vllm"))
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
DEFAULT_CACHE = Path(os.environ.get("TRACEKIT_TEST_CACHE", REPO / "tests" / ".cache"))

# Llama shapes. head_dim = hidden / heads must be one the CPU attention backend takes.
# "tiny": step time is almost pure overhead (fast functional tests).
# "medium": ~30M parameters, so step time grows visibly with batch size and tokens
# (what a step-time model must learn; used for calibration).
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
    "medium": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8),
}
VOCAB_SIZE = 2048
BUILD_VERSION = 3  # bump when the builder changes: cached folders are keyed by it
# RoPE: positions cost no weights. Long enough that a request of this many tokens outlives
# a test's stop + drain on a fast machine (at 2048 one finished in 8 s at 4 ms a token).
MAX_POSITIONS = 16384

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def native_dtype(cpuinfo: str | None = None) -> str:
    """bfloat16 only where the CPU has native bf16 arithmetic (AVX512_BF16 or AMX-BF16),
    else float32: without it vLLM's CPU backend falls back from oneDNN to slow torch
    linears ("Failed to create oneDNN linear")."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return "bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"


@dataclass
class ServerSpeed:
    """How fast the server at hand is, measured once: the base for every load, window
    and timeout of a test that uses it."""

    ttft_s: float  # one request alone: time to its first token
    decode_s: float  # one request alone: seconds per output token after the first
    batch_decode_s: float  # with `batch` requests running: seconds per step
    batch: int

    def seconds(self, tokens: int, running: int = 1) -> float:
        """About how long `tokens` output tokens take with `running` requests running."""
        per = self.decode_s if running <= 1 else self.batch_decode_s * max(running / self.batch, 1.0)
        return self.ttft_s + tokens * per


def _stream_times(url: str, body: Mapping[str, Any], timeout: float) -> tuple[float, float, int]:
    """(first token s, last token s, events) of one streamed completion."""
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first = last = None
    n = 0
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for line in r:
            if line.startswith(b"data: {"):
                now = time.perf_counter() - t0
                first = now if first is None else first
                last = now
                n += 1
    assert first is not None and last is not None
    return first, last, n


def measure_speed(url: str, model: str, tokens: int = 32, batch: int = 8, timeout: float = 600) -> ServerSpeed:
    """Time one request alone, then `batch` at once (after a warm-up request)."""
    import concurrent.futures

    body = {"model": model, "prompt": list(range(100, 132)), "max_tokens": tokens, "ignore_eos": True}
    _stream_times(url, {**body, "max_tokens": 2}, timeout)  # warm-up
    first, last, n = _stream_times(url, body, timeout)
    with concurrent.futures.ThreadPoolExecutor(batch) as pool:
        t0 = time.perf_counter()
        runs = list(pool.map(lambda i: _stream_times(url, {**body, "prompt": list(range(200 + i, 232 + i))}, timeout),
                             range(batch)))
        elapsed = time.perf_counter() - t0
    # From the batch's whole time, not its token gaps: an API server starved of CPU hands
    # the tokens out in bunches, and gaps within a bunch are near zero.
    steps = max(max(k for _, _, k in runs) - 1, 1)
    per_step = max(elapsed - first, elapsed / (steps + 1)) / steps
    return ServerSpeed(ttft_s=first, decode_s=(last - first) / max(n - 1, 1), batch_decode_s=per_step, batch=batch)


def gauges(url: str, timeout: float = 5) -> dict[str, float]:
    """`vllm:num_requests_running` and `vllm:num_requests_waiting` (summed over engines)."""
    with urllib.request.urlopen(url + "/metrics", timeout=timeout) as r:
        text = r.read().decode()
    out = {"running": 0.0, "waiting": 0.0}
    for line in text.splitlines():
        for key in out:
            if line.startswith(f"vllm:num_requests_{key}{{") or line.startswith(f"vllm:num_requests_{key} "):
                out[key] += float(line.rsplit(" ", 1)[1])
    return out


def vllm_available() -> bool:
    """True when the separate vLLM environment exists (CI installs it)."""
    return VLLM_PYTHON.exists()


def _run_vllm_python(script: str, args: list[str], what: str, timeout: float = 600) -> None:
    if not vllm_available():
        raise RuntimeError(f"{VLLM_PYTHON} not found: run `make setup-vllm`")
    env = dict(os.environ, **OFFLINE_ENV)
    proc = subprocess.run(
        [str(VLLM_PYTHON), "-c", script, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"building {what} failed (exit {proc.returncode}):\n{tail}")


_MODEL_SCRIPT = textwrap.dedent(
    """
    import json, random, sys
    from pathlib import Path
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(sys.argv[1]); shape = json.loads(sys.argv[2]); seed = int(sys.argv[3])
    vocab = int(sys.argv[4]); max_pos = int(sys.argv[5])
    out.mkdir(parents=True, exist_ok=True)

    # Tokenizer: byte-level BPE trained on generated pseudo-words (no corpus download).
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "ve", "zu", "an", "or", "el"]
    def word():
        return "".join(rng.choice(syll) for _ in range(rng.randint(1, 4)))
    text = [" ".join(word() for _ in range(rng.randint(5, 30))) + rng.choice([".", "?", "!", ","])
            for _ in range(4000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.model_max_length = max_pos
    # A plain chat template so /v1/chat/completions works too.
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=max_pos,
                      num_key_value_heads=shape["num_attention_heads"],
                      bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, **shape)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                continue
            p.normal_(0.0, 0.08)
    model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    (out / "tracekit_model.json").write_text(json.dumps({"params": n, **shape, "vocab_size": vocab}))
    """
)

_ADAPTER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model_dir = Path(sys.argv[1])
    for out, rank, seed in json.loads(sys.argv[2]):  # one process builds them all
        out = Path(out)
        torch.manual_seed(seed)
        base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                         "gate_proj", "up_proj", "down_proj"])
        peft_model = get_peft_model(base, cfg)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:  # nonzero B: the adapter really changes outputs
                    p.normal_(0.0, 0.05)
        peft_model.save_pretrained(out)
        ac = out / "adapter_config.json"
        conf = json.loads(ac.read_text())
        conf["base_model_name_or_path"] = str(model_dir)
        ac.write_text(json.dumps(conf, indent=2))
        (out / ".done").write_text("ok")
    """
)


def _done(path: Path) -> bool:
    return (path / ".done").exists()


def _mark_done(path: Path) -> None:
    (path / ".done").write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def build_model(cache_dir: str | os.PathLike[str] | None = None, size: str = "tiny", seed: int = 0) -> Path:
    """A random Llama of `size` ("tiny" or "medium") with its tokenizer, built once into the cache."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    out = root / f"llama-{size}-s{seed}-v{BUILD_VERSION}"
    if _done(out):
        return out
    shutil.rmtree(out, ignore_errors=True)  # a half-built folder from a killed run
    _run_vllm_python(
        _MODEL_SCRIPT,
        [str(out), json.dumps(SIZES[size]), str(seed), str(VOCAB_SIZE), str(MAX_POSITIONS)],
        f"model {size}",
    )
    _mark_done(out)
    return out


def build_adapters(
    model_dir: str | os.PathLike[str],
    ranks: Mapping[str, int],
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> dict[str, Path]:
    """LoRA adapters `{name: rank}` for `model_dir` (built once each); returns name -> folder."""
    model_dir = Path(model_dir).resolve()
    root = Path(cache_dir) if cache_dir is not None else model_dir.parent
    out: dict[str, Path] = {}
    todo: list[tuple[str, int, int]] = []
    for i, (name, rank) in enumerate(sorted(ranks.items())):
        # Folder named by base model, rank and seed, so adapters are shared across tests.
        path = (root / f"lora-{model_dir.name}-r{int(rank)}-s{seed + i}").resolve()
        if not _done(path):
            shutil.rmtree(path, ignore_errors=True)  # a half-built folder from a killed run
            todo.append((str(path), int(rank), seed + i))
        out[name] = path
    if todo:
        _run_vllm_python(_ADAPTER_SCRIPT, [str(model_dir), json.dumps(todo)], f"{len(todo)} adapter(s)")
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


TRACEKIT = [sys.executable, "-c", "from tracekit.cli import main; main()"]


def cli(pkg: str, *args: str, timeout: float = 1800, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`pkg`'s command line (tracekit, twin, replay, predictor) as its own process, output
    captured; a failure raises with the tail of its output."""
    r = subprocess.run([sys.executable, "-c", f"from {pkg}.cli import main; main()", *args],
                       capture_output=True, text=True, timeout=timeout, cwd=cwd)  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"{pkg} {' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r


def start_proxy(
    upstream: str, out: Path, *extra: str, log: Path | None = None, capture: bool = False, timeout: float = 60.0
) -> tuple[subprocess.Popen[Any], str]:
    """`tracekit proxy` in front of `upstream`, capturing into `out` (a part every 2 s),
    once its /health answers: (process, its URL). Its output goes to `log`, or to pipes
    the caller reads (`capture`, as text), or nowhere. The caller stops it."""
    port = free_port()
    if capture:
        stdout, stderr = subprocess.PIPE, subprocess.PIPE
    else:
        stdout, stderr = (log.open("wb") if log is not None else subprocess.DEVNULL), subprocess.STDOUT
    p = subprocess.Popen([*TRACEKIT, "proxy", "--upstream", upstream, "--listen", f"127.0.0.1:{port}",
                          "--out", str(out), "--flush-every", "2", *extra],
                         stdout=stdout, stderr=stderr, text=capture)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return p, url
        except OSError:
            time.sleep(0.1)
    p.kill()
    raise TimeoutError("proxy did not start")


def run_delay_s(pid: int, tid: int | None = None) -> float:
    """Seconds task `tid` of process `pid` (its main thread by default) has spent runnable
    but off the CPU: schedstat's run_delay; 0 where the kernel does not keep it.

    Why: the 2-core VMs here, with a vLLM worker spinning on one core, can keep a runnable
    process off the CPU for tens of seconds (a stopping proxy waited 21 s, once 80 s, and
    a probe process beside it stalled at the same moments). A wall-clock bound on a
    process's own work adds the time the machine did not give it."""
    path = Path(f"/proc/{pid}/task/{tid}/schedstat" if tid else f"/proc/{pid}/schedstat")
    try:
        return int(path.read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class Stalls:
    """From now on, the time the machine kept any of `pids` (their main threads), and
    with `this_thread` the calling thread, runnable off the CPU: the largest over them
    (`run_delay_s`; they stall together)."""

    def __init__(self, *pids: int, this_thread: bool = False) -> None:
        self.tasks: list[tuple[int, int | None]] = [(p, None) for p in pids]
        if this_thread:
            self.tasks.append((os.getpid(), threading.get_native_id()))
        self.start = [run_delay_s(p, t) for p, t in self.tasks]

    def since(self) -> float:
        return max([run_delay_s(p, t) - s for (p, t), s in zip(self.tasks, self.start, strict=True)] + [0.0])


def wait_exit(proc: subprocess.Popen[Any], timeout: float, stalls: Stalls) -> tuple[float, float]:
    """Wait for `proc` to exit, `timeout` s of the time the machine gave it (wall time
    less `stalls`, started on `proc` before, at most 10x `timeout` in all; else
    TimeoutError); then reap it.

    Returns (the perf_counter when its exit was seen, the seconds it or this thread spent
    runnable but off the CPU meanwhile, the larger of the two). Its run delay is read
    while it is still a zombie (waitid WNOWAIT), so it covers the whole of its exit."""
    mine = Stalls(this_thread=True)
    t0 = time.monotonic()
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
        waited, stalled = time.monotonic() - t0, stalls.since()
        if waited - stalled > timeout or waited > 10 * timeout:
            stat = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[-1].split()
            raise TimeoutError(
                f"pid {proc.pid} did not exit in {timeout:g} s: waited {waited:.1f} s, {stalled:.1f} s of it "
                f"runnable off the CPU; state {stat[0]}, {int(stat[11]) / os.sysconf('SC_CLK_TCK'):.1f} s of user CPU in all")
        time.sleep(0.02)
    seen = time.perf_counter()
    stalled = max(stalls.since(), mine.since())
    proc.wait()
    return seen, stalled


def hang_up(req: asyncio.Task[Any]) -> None:
    """The client goes away: a request still waiting for its headers is cancelled; a
    stream whose headers came (vLLM sends them before the first token) is closed."""
    if req.done() and not req.cancelled() and req.exception() is None:
        req.result().close()
    else:
        req.cancel()


class VllmServer:
    """A real vLLM OpenAI server in a subprocess, as a context manager.

    with VllmServer(model_dir, adapters={"a1": path}, max_loras=2) as srv:
        srv.url  # http://127.0.0.1:PORT

    The server gets its own TMPDIR (removed at exit) so the `vllm_dist_*` files it leaves
    never pile up in the shared temporary folder."""

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        adapters: Mapping[str, str | os.PathLike[str]] | None = None,
        *,
        served_model_name: str = "base",
        max_loras: int = 2,
        max_cpu_loras: int | None = None,
        max_lora_rank: int = 16,
        max_num_seqs: int = 8,
        max_num_batched_tokens: int | None = None,
        max_model_len: int = 512,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        extra_args: list[str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        kv_cache_space_gib: int = 1,
        startup_timeout: float = 240.0,
        dtype: str | None = None,
    ):
        self.model_dir = Path(model_dir)
        self.adapters = {k: Path(v) for k, v in (adapters or {}).items()}
        self.served_model_name = served_model_name
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.max_lora_rank = max_lora_rank
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.port = port or free_port()
        self.env_extra = dict(env or {})
        self.extra_args = list(extra_args or [])
        self.kv_cache_space_gib = kv_cache_space_gib
        self.startup_timeout = startup_timeout
        self.dtype = dtype or native_dtype()
        self._tmp = Path(tempfile.mkdtemp(prefix="tracekit-vllm-"))
        self.log_path = Path(log_path) if log_path else self._tmp / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--served-model-name", self.served_model_name,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--max-num-seqs", str(self.max_num_seqs),
            "--max-model-len", str(self.max_model_len),
            "--dtype", self.dtype, "--enforce-eager",
        ]  # fmt: skip
        if self.max_num_batched_tokens is not None:
            cmd += ["--max-num-batched-tokens", str(self.max_num_batched_tokens)]
        if self.adapters:
            cmd += ["--enable-lora", "--max-loras", str(self.max_loras), "--max-lora-rank", str(self.max_lora_rank)]
            if self.max_cpu_loras is not None:
                cmd += ["--max-cpu-loras", str(self.max_cpu_loras)]
            cmd += ["--lora-modules", *(f"{k}={v}" for k, v in self.adapters.items())]
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(OFFLINE_ENV)
        env.update(
            {
                "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_space_gib),
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                "TMPDIR": str(self._tmp),
                "PYTHONUNBUFFERED": "1",
            }
        )
        # Capture is opt-in: a parent's TRACEKIT_STEPS_DIR must not leak into a server.
        env.pop("TRACEKIT_STEPS_DIR", None)
        env.update(self.env_extra)
        return env

    def start(self) -> VllmServer:
        if not vllm_available():
            raise RuntimeError(f"{VLLM_PYTHON} not found: run `make setup-vllm`")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.command(),
            env=self.environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: stop() reaches the EngineCore child too
        )
        log.close()
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode} during startup:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"vLLM server not healthy after {self.startup_timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 20.0, group: bool = True, sig: int = signal.SIGTERM) -> int | None:
        """SIGTERM the server's process group (as systemd does; `sig=SIGINT`: Ctrl-C in its
        terminal), or with group=False only the API server (as `docker stop` does);
        SIGKILL what lingers; remove temp files."""
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                if group:
                    _signal_group(self.proc.pid, sig)
                else:
                    self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    _signal_group(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=10)
            # Children (EngineCore) may outlive the API process by a moment: give them the
            # grace a process manager gives (systemd, Kubernetes: seconds), then SIGKILL.
            _wait_group_gone(self.proc.pid, timeout=10.0)
            _signal_group(self.proc.pid, signal.SIGKILL)
            _wait_group_gone(self.proc.pid)
            rc = self.proc.returncode
        # Errors already carry the log tail; a caller who wants the log passes log_path.
        shutil.rmtree(self._tmp, ignore_errors=True)
        return rc

    def post_json(self, path: str, body: Mapping[str, Any], timeout: float = 60) -> dict[str, Any]:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:  # last resort if a caller forgot to stop
        if self.proc is not None and self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGKILL)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.1)
