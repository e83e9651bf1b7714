"""The compressed-proxy benchmark (benchmarks/transfer/proxy.py): the learning-rate area it compresses and the
leave-one-source-out line its README numbers read, on hand-made data."""

import math

import pytest
from benchmark_scripts import load_transfer_script



@pytest.fixture(scope="module")
def proxy():
    return load_transfer_script("proxy")


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


def test_step0_warnings_read_the_proxy_through_its_held_out_line(proxy, tmp_path):
    """The proxy as the step-0 forecast of the lead-time curve: each source's prediction is the line fitted on the
    other sources (exact here, so the held-out truth is recovered), both seeds' units get it, the source's own
    domain is left out, and the interval's width is the line's residual spread (zero for an exact line, wider
    when the other sources scatter)."""
    import json

    sources = ["changelog", "legal", "math", "markup"]
    proxies = {s: {d: 0.01 * (i + 1) + 0.004 * j for j, d in enumerate(sources)} for i, s in enumerate(sources)}
    for s in sources:
        (tmp_path / f"proxy-lora-{s}-seed0-k16.json").write_text(json.dumps({"nll_delta_rel": proxies[s]}))
        for seed in (0, 1):
            truth = {d: 2 * v - 0.01 for d, v in proxies[s].items()}
            (tmp_path / f"precise-lora-{s}-seed{seed}.json").write_text(json.dumps({"nll_delta_rel": truth}))
    predictions = proxy.step0_predictions(tmp_path, 16)
    assert set(predictions) == {f"lora-{s}-seed{k}" for s in sources for k in (0, 1)}
    legal = predictions["lora-legal-seed1"]
    assert set(legal) == set(sources) - {"legal"}
    for domain, (mean, low) in legal.items():
        assert mean == pytest.approx(2 * proxies["legal"][domain] - 0.01)
        assert low == pytest.approx(mean, abs=1e-9)
    noisy = {**proxies["math"], "changelog": proxies["math"]["changelog"] + 0.05}
    (tmp_path / "precise-lora-math-seed0.json").write_text(json.dumps(
        {"nll_delta_rel": {d: 2 * v - 0.01 for d, v in noisy.items()}}))
    mean, low = proxy.step0_predictions(tmp_path, 16)["lora-legal-seed0"]["markup"]
    assert mean - low > 0.01


def test_an_excluded_source_is_neither_fitted_nor_predicted(proxy, tmp_path):
    """The nested leave-one-out of the blended step-0 forecast: with a source excluded, its truth (however wrong)
    changes no other source's prediction, and it gets none itself."""
    import json

    sources = ["changelog", "legal", "math", "markup"]
    proxies = {s: {d: 0.01 * (i + 1) + 0.004 * j for j, d in enumerate(sources)} for i, s in enumerate(sources)}
    for s in sources:
        (tmp_path / f"proxy-lora-{s}-seed0-k16.json").write_text(json.dumps({"nll_delta_rel": proxies[s]}))
        truth = {d: (99.0 if s == "math" else 2 * v - 0.01) for d, v in proxies[s].items()}
        (tmp_path / f"precise-lora-{s}-seed0.json").write_text(json.dumps({"nll_delta_rel": truth}))
    predictions = proxy.step0_predictions(tmp_path, 16, exclude=frozenset({"math"}))
    assert not any("math" in unit for unit in predictions)
    mean, low = predictions["lora-legal-seed0"]["markup"]
    assert mean == pytest.approx(2 * proxies["legal"]["markup"] - 0.01)
    assert low == pytest.approx(mean, abs=1e-9)


def test_the_blend_weight_is_the_least_squares_one_within_zero_and_one():
    import numpy as np

    step0_warnings = load_transfer_script("step0_warnings")
    first, second = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 0.0, 4.0, 2.0])
    weight, spread = step0_warnings.blend_fit(first, second, 0.3 * first + 0.7 * second)
    assert weight == pytest.approx(0.7) and spread == pytest.approx(0.0, abs=1e-12)
    assert step0_warnings.blend_fit(first, second, 2 * second - first)[0] == 1.0  # beyond the second: clipped
    assert step0_warnings.blend_fit(first, second, first)[0] == 0.0


def test_the_other_texts_truth_leaves_out_the_texts_the_proxy_was_measured_on(proxy, tmp_path):
    """The proxy measures a domain's first 2,048 tokens of the precise sample; the truth on the other texts is the
    paired change over the rest alone, so a change planted only in the first texts does not reach it."""
    import json

    base = {"math": [[100.0, 1000], [100.0, 1000], [50.0, 500], [80.0, 800]]}  # 2,000 tokens, then 1,300
    after = {"math": [[200.0, 1000], [200.0, 1000], [55.0, 500], [88.0, 800]]}  # +100% first, +10% after
    (tmp_path / "precise-base.json").write_text(json.dumps({"key": "k", "nll": base}))
    (tmp_path / "precise-lora-legal-seed0.json").write_text(json.dumps({"after": after}))
    truths = proxy.disjoint_truths(tmp_path)
    assert truths[0]["legal"]["math"] == pytest.approx(0.10)
    assert truths[1] == {}
    # the ceiling's forecast: the same run's change on the proxy's own texts (the first 2,048 tokens)
    assert proxy.disjoint_truths(tmp_path, part="first")[0]["legal"]["math"] == pytest.approx(1.0)
