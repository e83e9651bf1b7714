"""The compressed-proxy benchmark (benchmarks/transfer/proxy.py): the learning-rate area it compresses and the
leave-one-source-out line its README numbers read, on hand-made data."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "transfer" / "proxy.py"


@pytest.fixture(scope="module")
def proxy():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("proxy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_area_is_the_runs_own_schedule(proxy):
    """64 steps of cosine with 10% warm-up (7 steps) at 1e-3: linear up, then half a cosine down."""
    warmup = 7
    expected = sum(1e-3 * k / warmup for k in range(warmup)) + sum(
        1e-3 * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (64 - warmup))) for k in range(warmup, 64))
    assert proxy.schedule_area(64, 1e-3) == pytest.approx(expected)


def test_the_calibration_never_sees_the_held_out_source(proxy):
    """Every source's final change is 2 x its proxy - 1 (a line the fit must find); the held-out source's own
    truth, however wrong, changes nothing of its prediction."""
    domains = ["a", "b", "c", "d"]
    proxies = {s: {d: 0.1 * i + 0.03 * j for j, d in enumerate(domains)} for i, s in enumerate(domains)}
    truths = {s: {d: 2 * v - 1 for d, v in changes.items()} for s, changes in proxies.items()}
    predicted = proxy.calibrated(proxies, truths, "b", "global")
    assert predicted == pytest.approx(truths["b"])
    spoiled = {**truths, "b": {d: 99.0 for d in domains}}
    assert proxy.calibrated(proxies, spoiled, "b", "global") == pytest.approx(predicted)
    assert proxy.calibrated(proxies, spoiled, "b", "domain") == pytest.approx(
        proxy.calibrated(proxies, truths, "b", "domain"))
