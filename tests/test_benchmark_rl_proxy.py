"""The compressed GRPO benchmark's scoring (benchmarks/transfer/rl_proxy.py): each run's compressed changes against
the run's own precise final change, beside the registered baseline, on hand-made files."""

import json

import pytest
from benchmark_scripts import load_transfer_script



@pytest.fixture(scope="module")
def rl_proxy():
    return load_transfer_script("rl_proxy")


def test_the_score_reads_each_runs_precise_change_and_leaves_its_source_out(rl_proxy, tmp_path, monkeypatch):
    runs, proxies, prior = tmp_path / "rl", tmp_path / "rl_proxy", tmp_path / "prior.json"
    runs.mkdir(), proxies.mkdir()
    name = "grpo-legal-to-python_code-kl-long"
    truth = {"legal": 5.0, "math": 0.01, "markup": 0.03, "python_code": 0.02}  # the source's own: never scored
    (runs / f"{name}.json").write_text(json.dumps({"measured_precise": {"loss_delta": truth}}))
    (proxies / f"{name}.json").write_text(json.dumps({"source": "legal", "reward": [0.2, 0.3],
                                                      "nll_delta_rel": {"legal": -9.0, "math": 0.02, "markup": 0.06,
                                                                        "python_code": 0.04}}))
    prior.write_text(json.dumps({"families": {"prior": {name: {"pearson": 0.5}}}}))
    monkeypatch.setattr(rl_proxy, "OUT", proxies)
    monkeypatch.setattr(rl_proxy.rl, "OUT", runs)
    monkeypatch.setattr(rl_proxy, "HERE", tmp_path)
    monkeypatch.setattr(rl_proxy, "PRIOR", ("prior.json", "prior"))
    rl_proxy.score([name, "grpo-math-to-python_code-kl-long"], tmp_path / "out.json")  # the second not run yet
    out = json.loads((tmp_path / "out.json").read_text())
    assert [r["run"] for r in out["rows"]] == [name]
    row = out["rows"][0]
    assert row["pearson"] == pytest.approx(1.0) and row["direction"] == 1.0 and row["prior_pearson"] == 0.5
    assert out["summary"]["mean_pearson"] == pytest.approx(1.0) and out["summary"]["prior_mean_pearson_same_runs"] == 0.5
