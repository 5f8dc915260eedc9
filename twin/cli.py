"""`twin`: simulate vLLM serving a trace, and calibrate profiles."""

from __future__ import annotations

import os

# The twin does no linear algebra, yet numpy's OpenBLAS starts a thread per core that
# spins for tens of ms after import: 14% of a heavy hour's `twin run` CPU time on 2 cores
# (benchmarks/results/twin_speed.md). Set before anything imports numpy; a user's own
# setting stands. Fleet workers inherit it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import click  # noqa: E402

from tracekit import __version__  # noqa: E402
from tracekit.cliutil import LazyGroup, user_errors  # noqa: E402


@click.group(
    cls=LazyGroup,
    lazy={
        "run": "twin.run_cmd:run_cmd",
        "calibrate": "twin.calibrate:calibrate_cmd",
    },
)
@click.version_option(__version__, prog_name="twin")
def main() -> None:
    """Simulate vLLM serving with LoRA adapters; calibrate step-time profiles."""


def profile_row(prof: object) -> dict[str, str]:
    """One profile's facts for `twin profiles`: its name, model, GPU, vLLM it mirrors,
    KV tokens (at max_loras 8, rank 16, its server's max_num_seqs) and fit error."""
    from twin.config import ServingConfig

    d = getattr(prof, "data", {})
    st = d.get("step_time", {})
    err = st.get("fit_error", {})
    fit = []
    for key, label in (("mean_itl_s", "ITL"), ("duration_s", "duration"), ("held_out", "step")):
        if isinstance(err.get(key), dict) and "mape_pct" in err[key]:
            fit.append(f"{label} {err[key]['mape_pct']:.1f}%")
    mem = d.get("memory", {})
    try:
        kv = f"{prof.kv_capacity_tokens(ServingConfig.for_profile(prof, max_loras=8, max_lora_rank=16)):,}"  # type: ignore[attr-defined]
    except (KeyError, TypeError, ValueError):
        kv = "?"
    if mem.get("kind") == "fixed":
        kv = f"{int(mem.get('kv_tokens') or 0):,} (fixed)"
    hw = d.get("hardware", {})
    return {
        "name": str(getattr(prof, "name", "?")),
        "model": str(d.get("model", {}).get("name", "?")).rsplit("/", 1)[-1],
        "hardware": str(hw.get("gpu") or hw.get("device") or "?"),
        "vllm": str((d.get("server") or {}).get("vllm_version") or "0.8.5"),
        "kv": kv,
        "fit": ", ".join(fit) or "-",
        "from": str(d.get("fitted_from", {}).get("kind", "?")),
    }


@main.command("profiles")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list, a row per profile.")
@user_errors
def profiles_cmd(as_json: bool) -> None:
    """List the shipped profiles, one row each (KV tokens at --max-loras 8 and rank 16;
    fit error: leave-one-run-out or held-out-step MAPE)."""
    from rich.table import Table

    from tracekit.cliutil import console
    from twin.profile import PROFILES_DIR, load_profile, shipped_profiles

    if as_json:
        import json

        click.echo(json.dumps([profile_row(load_profile(name)) for name in shipped_profiles()], indent=2))
        return
    t = Table(title="shipped profiles", caption=str(PROFILES_DIR), pad_edge=False)
    # The name is what a user types after --profile: never wrapped or cut.
    t.add_column("profile", no_wrap=True, min_width=max((len(n) for n in shipped_profiles()), default=7))
    for col in ("model", "GPU", "vLLM", "KV tokens", "fit error", "fitted from"):
        t.add_column(col, justify="right" if col == "KV tokens" else "left", overflow="fold")
    for name in shipped_profiles():
        row = profile_row(load_profile(name))
        t.add_row(row["name"], row["model"], row["hardware"], row["vllm"], row["kv"], row["fit"], row["from"])
    console.print(t)
