"""The search's choice between max_loras values (predictor.search._better)."""

from __future__ import annotations

from predictor.search import MlResult, TwinRun, _better


def _run(ml: int, adapters: int, served: float, offered: float, load: float = 1.0) -> TwinRun:
    return TwinRun(max_loras=ml, adapters=adapters, served_frac=served, throughput_tok_s=served * offered,
                   offered_tok_s=offered, requests=1000, window_s=600.0, p99_ttft_ms=None, wall_s=0.1, load=load)


def test_where_the_whole_fleet_fits_the_one_serving_more_of_it_wins() -> None:
    """A user's 64 adapters fit at max_loras 16 and 32; 16 was probed past the fleet (a
    higher bound on its starving point), 32 ran once. 32 serves 5% more of the user's own
    traffic, so it is the better answer: the bounds on headroom come from unequal probing."""
    m16 = MlResult(max_loras=16, runs=[_run(16, 64, 0.920, 6031), _run(16, 64, 0.922, 6446, load=1.07)],
                   starving_point=69.9, fits=True, start=64)
    m32 = MlResult(max_loras=32, runs=[_run(32, 64, 0.969, 6031)], starving_point=68.9, fits=True, start=64)
    assert _better(m32, m16) and not _better(m16, m32)


def test_a_throughput_tie_within_the_resolution_goes_to_headroom_then_fewer_slots() -> None:
    m32 = MlResult(max_loras=32, runs=[_run(32, 64, 0.969, 6031)], starving_point=68.9, fits=True, start=64)
    m64 = MlResult(max_loras=64, runs=[_run(64, 64, 0.980, 6031)], starving_point=69.7, fits=True, start=64)
    assert _better(m64, m32)  # 1% more served: a tie; the larger starving point wins
    same = MlResult(max_loras=16, runs=[_run(16, 64, 0.969, 6031)], starving_point=68.9, fits=True, start=64)
    assert _better(same, m32) and not _better(m32, same)  # exact tie: fewer slots


def test_a_fleet_that_does_not_fit_is_still_judged_by_its_starving_point() -> None:
    small = MlResult(max_loras=16, runs=[_run(16, 120, 0.95, 9000), _run(16, 150, 0.85, 11000)],
                     starving_point=140.0, fits=False, start=120)
    big = MlResult(max_loras=64, runs=[_run(64, 120, 0.99, 9000), _run(64, 170, 0.86, 12000)],
                   starving_point=160.0, fits=False, start=120)
    assert _better(big, small) and not _better(small, big)
