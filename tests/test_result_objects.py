"""The result objects as a notebook user meets them after the computation: display, round trips, copies, and
errors for wrong arguments (a hunt of the Python API)."""

import copy
import json
import pickle

import pytest
from test_forecast import LAYER, model, small_config, targets, tokenizer  # noqa: F401 - the fixtures too
from tiny import TinySAE, domain_texts

from sts_callback import STSConfigError, STSInputError, forecast
from sts_callback.pipelines.forecast import Forecast
from sts_callback.pipelines.gate import GateDecision, MixtureRejected, filter_examples, gate_mixture
from sts_callback.scoring.calibration import Calibration


@pytest.fixture(scope="module")
def sae():
    return TinySAE(32, 64, hook_name=f"blocks.{LAYER}.hook_resid_post").double()


@pytest.fixture(scope="module")
def result(model, tokenizer, sae):
    return forecast(model, tokenizer, sae, domain_texts("law", 30), targets(), small_config())


def pretty(value) -> str:
    """What IPython's display shows (its printer calls ``_repr_pretty_``; IPython is not a dependency)."""
    class Printer:
        shown = ""

        def text(self, text):
            self.shown += text
    printer = Printer()
    value._repr_pretty_(printer, False)
    return printer.shown


def calibration_for(plain: Forecast) -> Calibration:
    """A line on STS_act over the forecast's own range (predictions of both signs)."""
    acts = sorted(d.scores["sts_act"] for d in plain.domains.values())
    xs = [acts[0] + (acts[-1] - acts[0]) * i / 9 for i in range(10)]
    ys = [0.5 * i / 9 - 0.1 + (0.003 if i % 2 else -0.003) for i in range(10)]
    return Calibration.fit(xs, ys, ["sts_act"], level=0.9)


def test_a_forecast_shows_a_summary_and_its_table_in_a_notebook(result):
    """The dataclass repr was one line of every field (342k characters at the defaults, mostly latent contexts),
    what a notebook cell ending in the result showed."""
    assert repr(result).startswith("<Forecast: 3 target domains") and len(repr(result)) < 300
    assert pretty(result) == result.table() == str(result)


def test_a_failed_calibration_leaves_the_forecast_as_it_was_and_names_paths_are_accepted(result, tmp_path):
    calibrated = copy.deepcopy(result)
    calibration = calibration_for(result)
    calibrated.apply_calibration(calibration)
    before = copy.deepcopy(calibrated.predictions)
    with pytest.raises(STSConfigError, match="exclude"):
        calibrated.apply_calibration(calibration, exclude=["cod"])  # a typo
    assert calibrated.predictions == before and calibrated.predictions
    path = calibration.save(tmp_path / "calibration.json")
    by_path = copy.deepcopy(result).apply_calibration(str(path), exclude="code")  # a path; one name as a string
    assert set(by_path.predictions) == set(before) - {"code"}


def test_wrong_arguments_are_named_with_what_there_is(result):
    for call, words in ((lambda: result.table(variant="bogus"), "Unknown score variant"),
                        (lambda: result.table(view="prediction"), "view='prediction'"),
                        (lambda: result.score("nope"), "not a target domain"),
                        (lambda: result.score("code", "bogus"), "Unknown score variant"),
                        (lambda: result.ranked("lookahead"), "not computed")):
        with pytest.raises(STSConfigError, match=words):
            call()
    signed = result.ranked("forgetting_minus_transfer")  # a signed feature the table shows ranks too
    values = [v for _, v in signed]
    assert values == sorted(values, reverse=True) and len(values) == 3
    calibrated = copy.deepcopy(result).apply_calibration(calibration_for(result))
    assert "ranked by STS_act" in calibrated.table("sts_act").splitlines()[0]  # a named variant: the scores


def test_round_trips_copies_and_strict_json(result, tmp_path):
    data = result.to_dict()
    data["shifted_latents"].clear()  # editing the plain copy leaves the forecast whole
    assert result.shifted_latents
    odd = copy.deepcopy(result)
    odd.domains["code"].scores["sts_act"] = float("nan")
    path = odd.save(tmp_path / "forecast.json")
    text = path.read_text()
    assert "NaN" not in text and json.loads(text)["domains"]["code"]["scores"]["sts_act"] is None
    assert [name for name, _ in odd.ranked("sts_act")][-1] == "code"  # NaN ranks last, whatever the order
    odd.domains["code"].scores["sts_act"] = float("inf")
    assert odd.ranked("sts_act")[0][0] == "code"  # +inf is the most affected
    (tmp_path / "cut.json").write_text(path.read_text()[:50])
    with pytest.raises(STSInputError, match="Cannot read the forecast"):
        Forecast.load(tmp_path / "cut.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(STSInputError, match="Not an STS forecast"):
        Forecast.load(tmp_path / "list.json")
    newer = {**result.to_dict(), "made_up_field": 1}
    with pytest.raises(STSInputError, match="made_up_field"):
        Forecast.from_dict(newer)
    per_domain = result.to_dict()
    per_domain["domains"]["code"]["extra"] = 1  # had raised a bare TypeError
    with pytest.raises(STSInputError, match=r"domain 'code' has fields this version does not know \(\['extra'\]\)"):
        Forecast.from_dict(per_domain)


@pytest.fixture(scope="module")
def decision(model, tokenizer, sae):
    pool = {"law": domain_texts("law", 20, seed=4), "chem": domain_texts("chem", 20, seed=5)}
    return gate_mixture(model, tokenizer, sae, pool, targets(), "food", config=small_config()), pool


def test_a_gate_decision_shows_a_summary_and_its_table(decision):
    result, _ = decision
    assert repr(result).startswith("<GateDecision: 2 candidates") and len(repr(result)) < 300
    assert pretty(result) == result.table()


def test_filtering_a_loaded_decision_with_other_data_of_the_same_length_is_refused(decision, tmp_path):
    result, pool = decision
    loaded = GateDecision.load(result.save(tmp_path / "gate.json"))
    kept = filter_examples(loaded, "law", keep_fraction=0.5, data=pool["law"])
    assert kept.indices == filter_examples(result, "law", keep_fraction=0.5).indices
    for other in (pool["law"][::-1], domain_texts("sport", 20, seed=9)):
        with pytest.raises(STSInputError, match="not the one that was gated"):
            filter_examples(loaded, "law", keep_fraction=0.5, data=other)


def test_mixture_rejected_crosses_a_process_boundary(decision):
    """Its two-argument constructor could not be unpickled: a process pool's worker that raised it broke the pool
    and lost the reasons."""
    result, _ = decision
    error = pickle.loads(pickle.dumps(MixtureRejected("every candidate rejected", result)))
    assert str(error) == "every candidate rejected" and error.decision.table() == result.table()


def test_wide_names_keep_the_gate_table_aligned(model, tokenizer, sae):
    pool = {"法律数据": domain_texts("law", 20, seed=4), "chem\tv2": domain_texts("chem", 20, seed=5)}
    result = gate_mixture(model, tokenizer, sae, pool, targets(), "food", config=small_config())
    lines = result.table().splitlines()
    from sts_callback.pipelines.forecast import display_width

    header, rows = lines[1], lines[3:5]
    decision_column = display_width(header[:header.index("decision")])
    assert all(display_width(row[:row.index("accept" if "accept" in row else "REJECT")]) == decision_column
               for row in rows)
    assert "\t" not in result.table()


def test_a_report_of_a_folder_with_a_foreign_json_names_it(tmp_path):
    from sts_callback.reporting.report import ReportData

    (tmp_path / "forecast.json").write_text("[1, 2]")  # another tool's file where the forecast belongs
    with pytest.raises(STSInputError, match="Not an STS forecast file"):
        ReportData(tmp_path)


def test_a_validation_result_shows_a_summary_and_its_table_in_a_notebook():
    """Its dataclass repr dumped every seed's scores (8 kB for one seed), unlike the forecast and the decision."""
    from fake_validation import fake_validation

    scores = {d: {"sts_act": float(i), "sts_icl": float(-i)} for i, d in enumerate(("law", "food", "chem"))}
    result = fake_validation([scores, scores], [{"law": 0.01, "food": 0.03, "chem": -0.02}] * 2)
    assert repr(result).startswith("<ValidationResult: 3 target domains, 2 seed(s) of lora training")
    assert len(repr(result)) < 300 and pretty(result) == result.table() == str(result)
