"""The in-context NLL change as a forecast score (``icl_loss_change``): what it measures, when it is computed."""

import random

import numpy as np
import pytest
import torch
from tiny import TinySAE, domain_texts, make_model, make_tokenizer

from sts_callback import STSConfig, STSConfigError, STSDataWarning, forecast
from sts_callback.core.data import load_corpus
from sts_callback.pipelines.forecast import build_shift_pairs, prompt_builder
from sts_callback.pipelines.icl_loss import icl_loss_change
from sts_callback.scoring.calibration import Calibration

DOMAINS = ("law", "food", "chem")
SMALL = dict(n_shifted=8, shift_tokens=200, domain_tokens=100, n_domain_demonstrations=2, batch_size=3,
             max_query_tokens=24, max_demonstration_tokens=24)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model():
    return make_model("llama").double().eval()


def sae():
    return TinySAE(32, 64, hook_name="blocks.1.hook_resid_post")


def targets():
    return {d: domain_texts(d, 12) for d in DOMAINS}


def icl_calibration() -> Calibration:
    """A level + pattern calibration reading the in-context NLL change and a signed SAE score, with the prior."""
    runs = []
    for k, own in enumerate((-0.3, -0.1, 0.0, -0.2, -0.25)):
        x = np.array([[0.1 * k, -0.02 * k], [0.3, 0.01 * k], [-0.2, 0.05]])
        runs.append((x, [0.01 - 0.5 * own + 0.1 * x[0, 1], 0.02 - 0.5 * own, 0.05 - 0.4 * own], [], DOMAINS))
    return Calibration.fit_level_pattern(runs, ["signed_usage", "icl_loss_change"], [], domain_prior=True)


def dense_change(model, tokenizer, train, domain, config, tokens):
    """Reference: the same seeded pairs, each sequence alone through a plain forward, NLL of its query tokens."""
    builder = prompt_builder(model, tokenizer, config)
    rng = random.Random(f"{config.seed}:icl-loss:{domain}")
    pairs, _ = build_shift_pairs(load_corpus(targets()[domain], name=domain), builder, config, rng, tokens,
                                 config.n_demonstrations, demonstrations=load_corpus(train, name="train"))
    sums = {"base": [0.0, 0], "context": [0.0, 0]}
    with torch.no_grad():
        for pair in pairs:
            for side in ("base", "context"):
                ids = getattr(pair, side)
                logits = model(input_ids=torch.tensor([ids])).logits[0].double()
                nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
                flags = [False] * (len(ids) - len(pair.counted)) + list(pair.counted)  # flags: the last tokens'
                counted = torch.tensor(flags[1:])  # nll[t] is the loss of token t + 1
                sums[side][0] += float(nll[counted].sum())
                sums[side][1] += int(counted.sum())
    before = sums["base"][0] / sums["base"][1]
    return (sums["context"][0] / sums["context"][1] - before) / before


def test_the_change_is_the_query_tokens_nll_with_and_without_training_demonstrations(model, tokenizer):
    train = domain_texts("law", 20, seed=1)
    config = STSConfig(**SMALL)
    measured = icl_loss_change(model, tokenizer, train, targets(), config, tokens=96)
    for domain in DOMAINS:
        assert measured[domain] == pytest.approx(dense_change(model, tokenizer, train, domain, config, 96), abs=1e-7)
    assert len({round(v, 9) for v in measured.values()}) == len(DOMAINS) and all(v != 0 for v in measured.values())


def test_a_forecast_computes_it_when_its_calibration_reads_it(model, tokenizer):
    train = domain_texts("law", 20, seed=1)
    calibration = icl_calibration()
    result = forecast(model, tokenizer, sae(), train, targets(), SMALL, calibration=calibration)
    config = STSConfig(**SMALL)
    expected = icl_loss_change(model, tokenizer, train, targets(), config, tokens=384)
    assert result.settings["config"]["icl_loss_tokens"] == 384  # the default budget, recorded
    for domain in DOMAINS:
        assert result.domains[domain].scores["icl_loss_change"] == pytest.approx(expected[domain], rel=1e-9)
        assert result.predictions[domain]["mean"] == pytest.approx(calibration.predict_all(
            {d: result.domains[d].scores for d in DOMAINS})[domain].mean, rel=1e-9)
    assert result.timings["icl_loss_change"] > 0
    assert "icl_loss" in result.table(view="scores")

    plain = forecast(model, tokenizer, sae(), train, targets(), SMALL)  # no calibration reads it: not computed
    assert all("icl_loss_change" not in d.scores for d in plain.domains.values())
    asked = forecast(model, tokenizer, sae(), train, targets(), {**SMALL, "icl_loss_tokens": 96})
    measured = icl_loss_change(model, tokenizer, train, targets(), config, tokens=96)
    assert {d: asked.domains[d].scores["icl_loss_change"] for d in DOMAINS} == pytest.approx(measured, rel=1e-9)


def test_a_calibration_reading_it_is_refused_before_any_work_when_it_is_switched_off(model, tokenizer):
    with pytest.raises(STSConfigError, match=r"icl_loss_change.*icl_loss_tokens=0.*leave icl_loss_tokens=None"):
        forecast(model, tokenizer, sae(), domain_texts("law", 20), targets(), {**SMALL, "icl_loss_tokens": 0},
                 calibration=icl_calibration())
    with pytest.raises(STSConfigError, match=r"icl_loss_tokens must be an integer >= 0"):
        STSConfig(icl_loss_tokens=-1)
    with pytest.raises(STSConfigError, match=r"icl_loss_tokens=4 is below one short query"):
        STSConfig(icl_loss_tokens=4)


def test_the_callback_computes_it_at_train_start_for_a_calibration_that_reads_it(tmp_path, tokenizer):
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from sts_callback.integrations.callback import STSCallback

    runs = []
    for k, own in enumerate((-0.3, -0.1, 0.0, -0.2, -0.25)):
        x = np.array([[0.1 * k, -0.02 * k], [0.3, 0.01 * k], [-0.2, 0.05]])
        runs.append((x, [0.01 - 0.5 * own + 0.1 * x[0, 1], 0.02 - 0.5 * own, 0.05 - 0.4 * own], [own], DOMAINS))
    # what the built-in gemma3-270m-lora-lookahead-icl is: the level from the lookahead's own change, the pattern
    # from a signed SAE score, the in-context NLL change and the domain prior
    calibration = Calibration.fit_level_pattern(runs, ["signed_usage", "icl_loss_change"], ["lookahead_own"],
                                                domain_prior=True)
    calibration.fitted_on["icl_loss"] = {"max_query_tokens": 128}  # measured with longer queries than this run's
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", STSDataWarning)  # not at construction: before a process group, every rank
        callback = STSCallback(sae=sae(), target_domains={d: domain_texts(d, 30) for d in DOMAINS},
                               config={k: v for k, v in SMALL.items() if k != "batch_size"}, recheck_tokens=150,
                               loss_tokens=120, run_level="lookahead", run_level_steps=1, calibration=calibration)
    assert callback.config.icl_loss_tokens == 384  # decided at construction, from the calibration
    data = Dataset.from_dict({"text": domain_texts("law", 64)}).map(lambda b: tokenizer(b["text"]), batched=True,
                                                                    remove_columns=["text"])
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, save_steps=100, logging_steps=1,
                             use_cpu=True, report_to=[], per_device_train_batch_size=4, learning_rate=1e-2)
    with pytest.warns(STSDataWarning, match=r"measured with max_query_tokens=128, this forecast's with "
                                            r"max_query_tokens=24.*Pass STSConfig\(max_query_tokens=128\)"):
        Trainer(model=make_model("llama"), args=args, train_dataset=data, processing_class=tokenizer,
                data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), callbacks=[callback]).train()
    scores = {d: callback.forecast.domains[d].scores for d in DOMAINS}
    assert all(isinstance(scores[d]["icl_loss_change"], float) and scores[d]["icl_loss_change"] != 0 for d in DOMAINS)
    own = callback.session.run_level["own_change"]
    expected = calibration.predict_all(scores, {"lookahead_own": own})
    for d in DOMAINS:
        assert callback.predicted[d]["mean"] == pytest.approx(expected[d].mean, rel=1e-9)


def test_settings_other_than_those_it_was_fitted_with_are_warned_about_with_the_fix():
    from sts_callback.core.errors import STSDataWarning
    from sts_callback.pipelines.forecast import with_icl_loss
    from sts_callback.scoring.calibration import builtin_calibration

    builtin = builtin_calibration("gemma3-270m-lora-lookahead-icl")  # measured with 128-token queries and demos
    with pytest.warns(STSDataWarning, match=r"max_query_tokens=128, max_demonstration_tokens=128.*Pass STSConfig"):
        assert with_icl_loss(STSConfig(), builtin).icl_loss_tokens == 384
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as fitted: nothing to say
        fitted = STSConfig(max_query_tokens=128, max_demonstration_tokens=128, n_demonstrations=2)
        assert with_icl_loss(fitted, builtin).icl_loss_tokens == 384
        assert with_icl_loss(fitted, None).icl_loss_tokens == 0  # no calibration reads it: not computed
        assert with_icl_loss(fitted.replace(icl_loss_tokens=64), builtin).icl_loss_tokens == 64  # asked: kept


def test_a_preference_forecast_refuses_a_calibration_reading_it_before_any_work(model, tokenizer, monkeypatch):
    """A chosen-vs-rejected shift has no training texts to put in context: a calibration reading the change is
    refused at once (it ran the whole forecast, then blamed icl_loss_tokens=0); a budget asked for is said and
    skipped, never recorded as computed."""
    from sts_callback.core.errors import STSDataWarning
    from sts_callback.pipelines import preference
    from sts_callback.pipelines.preference import preference_forecast

    law, food = domain_texts("law", 6), domain_texts("food", 6)
    pairs = [{"prompt": "what is it ?", "chosen": " " + a, "rejected": " " + b} for a, b in zip(law, food)]
    monkeypatch.setattr(preference, "run_preference_forecast", lambda *a, **k: pytest.fail("the forecast ran"))
    with pytest.raises(STSConfigError, match=r"reads 'icl_loss_change'.*a chosen_vs_rejected forecast does not"):
        preference_forecast(model, tokenizer, sae(), pairs, targets(), SMALL, calibration=icl_calibration())
    monkeypatch.undo()
    with pytest.warns(STSDataWarning, match=r"icl_loss_tokens=96.*chosen_vs_rejected forecast has not"):
        result = preference_forecast(model, tokenizer, sae(), pairs, targets(), {**SMALL, "icl_loss_tokens": 96})
    assert all("icl_loss_change" not in d.scores for d in result.domains.values())
