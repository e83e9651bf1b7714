"""The Guard on its own: rules, patience, warn-once and state, with no Trainer."""

import math
import warnings

import pytest

from sts_callback.core.errors import STSConfigError, STSDataWarning
from sts_callback.pipelines.guard import Guard, GuardConfig
from sts_callback.pipelines.recheck import Recheck


def record(food_delta, law_delta=0.0, food_loss=2.0, accuracy=None, food_score=1.0):
    return Recheck(shift_total=0.0, shifted_latents=[], shift_values=[], overlap_with_forecast=None,
                   scores={"food": {"sts_icl": food_score, "sts_act": 0.5}, "law": {"sts_icl": 9.0, "sts_act": 9.0}},
                   loss={"food": food_loss, "law": 2.0}, loss_delta={"food": food_delta, "law": law_delta},
                   loss_delta_ci={}, loss_tokens={}, probe_tokens=0, sae_fit=None, seconds=0.0,
                   accuracy={"food": 0.5} if accuracy is not None else {},
                   accuracy_delta={"food": accuracy} if accuracy is not None else {})


def test_rules_apply_to_protected_domains_only():
    guard = Guard(GuardConfig(protected=["food"], tolerance=0.05, max_sts=2.0, accuracy_tolerance=0.02))
    assert guard.violations(record(0.04, law_delta=0.9), "sts_icl") == []
    assert "rose by 6.0%" in guard.violations(record(0.06), "sts_icl")[0]
    assert "not finite" in guard.violations(record(math.nan), "sts_icl")[0]
    assert "not finite" in guard.violations(record(0.0, food_loss=math.inf), "sts_icl")[0]
    # a share of items, in points (a "%" read as a relative change)
    assert "accuracy of protected domain 'food' fell by 3.0 points (53.0% -> 50.0%) (tolerance 2.0 points)" in \
        guard.violations(record(0.0, accuracy=-0.03), "sts_icl")[0]
    assert guard.violations(record(0.0, accuracy=-0.01), "sts_icl") == []
    assert "max_sts=2.0" in guard.violations(record(0.0, food_score=3.0), "sts_icl")[0]


def test_patience_counts_consecutive_violations_and_state_round_trips():
    guard = Guard(GuardConfig(protected=["food"], early_stop=True, patience=2))
    assert not guard.check(2, record(0.1), "sts_icl").stop
    assert not guard.check(4, record(0.0), "sts_icl").stop  # the streak is broken
    assert not guard.check(6, record(0.1), "sts_icl").stop
    decision = guard.check(8, record(0.1), "sts_icl")
    assert decision.stop and decision.reason.startswith("early stop at step 8 after 2 consecutive")
    restored = Guard(guard.config)
    restored.load_state(guard.state())
    assert restored.state() == guard.state()


def test_without_early_stop_nothing_stops():
    guard = Guard(GuardConfig(protected=["food"], patience=1))
    assert guard.check(2, record(0.5), "sts_icl").violations and not guard.check(4, record(0.5), "sts_icl").stop


def test_warnings_are_given_once_and_forecast_rank_rule():
    guard = Guard(GuardConfig(protected=["food"], forecast_top_k=1))
    assert guard.first_time("x") and not guard.first_time("x")
    assert list(guard.forecast_warnings([("food", 3.0), ("law", 1.0)], "sts_icl")) == ["forecast:food"]
    assert guard.forecast_warnings([("law", 3.0), ("food", 1.0)], "sts_icl") == {}
    assert guard.forecast_warnings([("law", 3.0), ("food", None)], "sts_icl") == {}  # not scored: no rank claim
    assert list(guard.projected({"food": 0.2}, {"food": 0.05}, 0.5)) == ["food"]
    assert guard.projected({"food": 0.2}, {"food": 0.05}, 1.0) == {}


@pytest.mark.parametrize("values, match", [
    ({"tolerance": -0.1}, "tolerance must be a non-negative"),
    ({"patience": 0}, "patience must be an integer >= 1"),
    ({"protected": "food"}, "protected must be a list"),
    ({"protected": {"food": 0.1}}, r"got a mapping .* pass protected=\['food'\] with tolerance="),  # was dropped
    ({"early_stop": "yes"}, "early_stop must be True, False or 'projected'"),
    ({"tolerence": 0.1}, r"Unknown guard setting\(s\) \['tolerence'\]"),
    ({"warn_confidence": 1.0}, "warn_confidence must be a probability strictly between 0 and 1"),
    ({"warn_confidence": 80}, "warn_confidence must be a probability strictly between 0 and 1"),
    ({"max_sts": -1}, r"max_sts must be a non-negative number .* got -1"),  # every score is above it
])
def test_bad_settings_are_named(values, match):
    with pytest.raises(STSConfigError, match=match):
        GuardConfig.from_dict(values)


def test_patience_without_early_stop_is_said_to_do_nothing():
    with pytest.warns(STSDataWarning, match="patience=3 has no effect without early_stop"):
        GuardConfig(protected=["food"], patience=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", STSDataWarning)
        GuardConfig(protected=["food"], patience=3, early_stop=True)


def test_sae_fit_rules():
    guard = Guard(GuardConfig(max_fvu=0.5, fvu_rise=0.1))
    assert list(guard.fit_warnings(None, {"fvu": 0.7, "l0": 30})) == ["fit:start"]
    assert guard.fit_warnings(None, {"fvu": 0.3, "l0": 30}) == {}
    assert guard.fit_warnings({"fvu": 0.3, "l0": 30}, {"fvu": 0.35, "l0": 31}) == {}
    assert list(guard.fit_warnings({"fvu": 0.3, "l0": 30}, {"fvu": 0.45, "l0": 40})) == ["fit:drift"]
    assert guard.fit_warnings({"fvu": 0.3, "l0": 30}, None) == {}


def test_projected_warnings_need_the_whole_interval_above_the_tolerance():
    guard = Guard(GuardConfig(protected=["food"], tolerance=0.05))
    early, measured = {"food": 0.2}, {"food": 0.05}
    assert guard.projected(early, measured, 0.5, {"food": [0.12, 0.28]})["food"].startswith(
        "protected domain 'food' is on course to get worse by 20.0% (interval +12.0% to +28.0%)")
    assert guard.projected(early, measured, 0.5, {"food": [0.04, 0.36]}) == {}  # may still end within tolerance
    assert guard.projected(early, measured, 0.5, {}) == {}  # no interval, no warning


def test_projected_early_stop_stops_on_projections_only_when_asked():
    projected = ["protected domain 'food' is on course to get worse by 20.0%"]
    measured_only = Guard(GuardConfig(protected=["food"], early_stop=True))
    assert not measured_only.check(2, record(0.01), "sts_icl", projected).stop
    on_projection = Guard(GuardConfig(protected=["food"], early_stop="projected", patience=2))
    assert not on_projection.check(2, record(0.01), "sts_icl", projected).stop
    decision = on_projection.check(4, record(0.02), "sts_icl", projected)
    assert decision.stop and decision.violations == []  # no measured violation yet: the stop comes earlier
    assert "projected by the early forecast" in decision.reason


def test_a_tolerance_given_as_a_percent_is_warned_about():
    with pytest.warns(STSDataWarning, match=r"tolerance=2 allows a loss rise of 200%.*pass tolerance=0.02"):
        GuardConfig(protected=["food"], tolerance=2)
    with pytest.warns(STSDataWarning, match=r"accuracy_tolerance=2 can never be exceeded.*accuracy_tolerance=0.02"):
        GuardConfig(protected=["food"], accuracy_tolerance=2)
    for one in (1, 1.0):  # a rise of 100% (1% meant?) and an accuracy that can never fall by more than 1
        with pytest.warns(STSDataWarning, match=r"tolerance=1(\.0)? allows a loss rise of 100%.*pass tolerance=0.01"):
            GuardConfig(protected=["food"], tolerance=one)
        with pytest.warns(STSDataWarning, match=r"accuracy_tolerance=1(\.0)? can never be exceeded"):
            GuardConfig(protected=["food"], accuracy_tolerance=one)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GuardConfig(protected=["food"], tolerance=0.02)
        GuardConfig(protected=["food"], tolerance=math.inf)  # the rule off, on purpose


def test_the_last_steps_violation_is_reported_but_is_no_early_stop():
    guard = Guard(GuardConfig(protected=["food"], early_stop=True))
    decision = guard.check(6, record(0.5), "sts_icl", finished=True)
    assert decision.violations and not decision.stop and guard.stop_reason is None


def test_a_failed_recheck_neither_counts_nor_breaks_a_run_of_violations():
    """Reset by each failed re-check, a re-check failing every other time kept a lasting violation (+81%, +108%,
    +112%) from ever stopping the run; read back from a history, a failed record holds the count too."""
    guard = Guard(GuardConfig(protected=["food"], early_stop=True, patience=2))
    assert not guard.check(1, record(0.5), "sts_icl").stop
    # step 2 failed (nothing measured, nothing said to the guard): step 3's violation is the second
    assert guard.check(3, record(0.5), "sts_icl").stop and "after 2 consecutive" in guard.stop_reason
    history = [{"step": 0}, {"step": 1, **record(0.5).to_dict()}, {"step": 2, "error": "OutOfMemoryError: ..."}]
    assert guard.violations_at_the_end_of(history, "sts_icl") == 1
    assert guard.violations_at_the_end_of([*history, {"step": 3, **record(0.01).to_dict()}], "sts_icl") == 0


def test_a_resume_under_other_rules_counts_the_kept_rechecks_by_them():
    """A run stopped under tolerance 2% and resumed with 90%: its re-checks of +81% are no violations now (counted
    by their stored violations, the resumed run stopped one re-check early); tightened, they are."""
    history = [{"step": 0}, *({"step": s, **record(d).to_dict(), "violations": ["kept from the old rules"]}
                              for s, d in ((2, 0.811), (4, 1.08)))]
    assert Guard(GuardConfig(protected=["food"], tolerance=0.9, early_stop=True)).violations_at_the_end_of(
        history, "sts_icl") == 1
    tight = [{"step": 0}, *({"step": s, **record(d).to_dict(), "violations": []} for s, d in ((2, 0.03), (4, 0.04)))]
    assert Guard(GuardConfig(protected=["food"], tolerance=0.02, early_stop=True)).violations_at_the_end_of(
        tight, "sts_icl") == 2


def test_messages_never_round_a_change_onto_the_tolerance():
    guard = Guard(GuardConfig(protected=["food"], tolerance=0.05))
    assert "rose by 5.02% (tolerance 5.0%)" in guard.violations(record(0.0502), "sts_icl")[0]


def test_percentages_show_the_sign_and_the_difference_that_matter():
    from sts_callback.core.formatting import signed_percent

    assert signed_percent(0.0004) == "+0.04%" and signed_percent(-0.0004) == "-0.04%"  # never +0.0% for a nonzero
    assert signed_percent(0.0502, apart_from=0.05) == "+5.02%" and signed_percent(0.05, apart_from=0.05) == "+5.0%"
    assert signed_percent(0.123) == "+12.3%" and signed_percent(0.0) == "+0.0%" and signed_percent(None) == "–"


def test_the_train_start_warning_needs_the_chance_of_a_violation_the_user_asked_for():
    # a 90% interval of +-3.3 points: a normal spread of 2 points
    near = {"mean": 0.06, "low": 0.06 - 0.0329, "high": 0.06 + 0.0329}  # 1 point above: 69% likely above 5%
    far = {"mean": 0.12, "low": 0.12 - 0.0329, "high": 0.12 + 0.0329}  # 3.5 spreads above: sure
    below = {"mean": 0.04, "low": 0.04 - 0.0329, "high": 0.04 + 0.0329}  # 1 point below: 31% likely above
    predicted = {"near": near, "far": far, "below": below}

    def warned(confidence):
        guard = Guard(GuardConfig(protected=["near", "far", "below"], warn_confidence=confidence))
        return sorted(key.split(":")[1] for key in guard.predicted_warnings(predicted, 0.9))

    assert warned(0.5) == ["far", "near"]  # the default: the predicted mean above the tolerance
    assert warned(0.8) == ["far"]  # a 69% chance is not enough
    assert warned(0.25) == ["below", "far", "near"]  # a 31% chance is
    message = Guard(GuardConfig(protected=["below"], warn_confidence=0.25)).predicted_warnings(predicted, 0.9)
    assert "a 31% chance of ending above the tolerance 5.0% (warn_confidence 0.25)" in message["predicted:below"]
    # no interval: the mean decides
    assert Guard(GuardConfig(protected=["x"], warn_confidence=0.9)).predicted_warnings(
        {"x": {"mean": 0.06, "low": 0.06, "high": 0.06}}, 0.9)


def test_with_a_calibration_the_rank_warning_follows_the_predicted_change():
    guard = Guard(GuardConfig(protected=["food"], forecast_top_k=1))
    # a domain predicted to improve is not "most affected", first or not (it had been warned about)
    assert guard.forecast_warnings([("food", -0.012), ("law", -0.02)], "predicted change", predicted=True) == {}
    message = guard.forecast_warnings([("food", 0.031), ("law", 0.012)], "predicted change", predicted=True)
    assert message["forecast:food"].endswith("most affected by this training (predicted change +3.1%).")


def test_losing_exactly_the_accuracy_tolerance_is_no_violation_whatever_the_start():
    """5/100 -> 3/100 is a delta of -0.020000000000000004 in floats: losing exactly 2 of 100 items was a violation
    (and an early stop) for 69 of 99 starting counts, under "more than accuracy_tolerance"."""
    guard = Guard(GuardConfig(protected=["food"], accuracy_tolerance=0.02))
    for right in range(2, 101):
        assert guard.violations(record(0.0, accuracy=(right - 2) / 100 - right / 100), "sts_icl") == [], right
        assert guard.violations(record(0.0, accuracy=(right - 2) / 100 - right / 100 - 0.01), "sts_icl")


def test_a_violation_is_new_when_it_starts_and_again_when_it_returns_and_survives_a_resume():
    guard = Guard(GuardConfig(protected=["food"], tolerance=0.05, max_sts=2.0))
    news = [guard.check(step, record(delta, food_score=score), "sts_icl").new_violations
            for step, delta, score in ((1, 0.1, 1.0), (2, 0.2, 1.0), (3, 0.0, 1.0), (4, 0.1, 3.0))]
    assert [len(n) for n in news] == [1, 0, 0, 2]  # lasting: said once; back after clearing, and a second rule
    assert "rose by 10.0%" in news[0][0] and "max_sts" in news[3][1]
    resumed = Guard(guard.config)
    resumed.load_state(guard.state())
    assert resumed.check(5, record(0.3, food_score=3.0), "sts_icl").new_violations == []
    diverged = resumed.check(6, record(math.nan, food_score=3.0), "sts_icl").new_violations  # worse: news again
    assert len(diverged) == 1 and "not finite" in diverged[0]


def test_a_violation_gives_its_interval_and_says_when_it_is_not_sure():
    """A measured violation counts on the change itself; when the held-out texts ran out before it was sure, the
    message (and with it the stop's reason and the report) showed +9.5% with no sign that -5% was as likely."""
    guard = Guard(GuardConfig(protected=["food"], tolerance=0.05))
    unsure, sure = record(0.095), record(0.095)
    unsure.loss_delta_ci["food"] = [-0.0525, 0.2429]
    sure.loss_delta_ci["food"] = [0.07, 0.12]
    message = guard.violations(unsure, "sts_icl")[0]
    assert "95% interval -5.2% to +24.3%" in message and "reaches below the tolerance" in message
    message = guard.violations(sure, "sts_icl")[0]
    assert "95% interval +7.0% to +12.0%" in message and "reaches below" not in message


def test_a_rank_among_as_many_domains_as_the_top_k_warns_of_nothing():
    """One target domain, protected: "ranks 1 of 1 among the domains most affected" warned of every run, harmed
    or not."""
    guard = Guard(GuardConfig(protected=["food"], forecast_top_k=1))
    assert guard.forecast_warnings([("food", 0.3)], "sts_icl") == {}
    assert "ranks 1 of 2" in guard.forecast_warnings([("food", 0.3), ("law", 0.1)], "sts_icl")["forecast:food"]
    # how far ahead of the next domain it ranks is said: 1% ahead ranks first as 10x ahead does
    close = guard.forecast_warnings([("food", 0.0027), ("law", 0.002673), ("code", 0.001)], "sts_icl")
    assert "the first domain below the top 1, 'law', scores 0.002673, 1% lower" in close["forecast:food"]
    assert Guard(GuardConfig(protected=["food"], forecast_top_k=2)).forecast_warnings(
        [("food", 0.3), ("law", 0.1)], "sts_icl") == {}


def test_a_resume_under_a_tighter_tolerance_counts_the_kept_projections_by_it():
    """With early_stop="projected", a kept re-check counted only if it had projected warnings under the old
    tolerance: tightened from 50% to 5%, projections of +20% (interval +15% .. +25%) never counted."""
    def kept(step):
        return {"step": step, **record(0.01).to_dict(), "early_forecast": {"food": 0.2, "law": 0.0},
                "early_forecast_ci": {"food": [0.15, 0.25]}, "lr_area_fraction": 0.1 * step,
                "projected_warnings": []}

    history = [{"step": 0}, kept(1), kept(2), kept(3)]
    guard = Guard(GuardConfig(protected=["food"], tolerance=0.05, early_stop="projected"))
    assert guard.violations_at_the_end_of(history, "sts_icl") == 2  # the first measured re-check projects nothing
    loose = Guard(GuardConfig(protected=["food"], tolerance=0.5, early_stop="projected"))
    assert loose.violations_at_the_end_of(history, "sts_icl") == 0

