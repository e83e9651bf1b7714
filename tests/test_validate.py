"""validate() and `sts validate`: forecast, real fine-tuning with the callback, correlations, outputs."""

import json
import math
import re
import warnings

import numpy as np
import pytest
import torch
import yaml
from tiny import TinySAE, domain_texts, make_model, make_tokenizer

from sts_callback import STSConfigError, STSDataWarning, STSInputError
from sts_callback.scoring.agreement import noise_ceiling
from sts_callback.core.formatting import json_safe
from sts_callback.validation.validate import (ValidationConfig, ValidationResult, _mean_std, choice_scores,
                                              correlation, multiple_choice_accuracy, validate)

DOMAINS = ("law", "food", "chem", "sport")
FAST = dict(n_shifted=8, shift_tokens=200, domain_tokens=100, n_domain_demonstrations=2)
CHEAP = dict(steps=2, batch_size=4, learning_rate=1e-2, loss_tokens=120, recheck_tokens=150, n_resamples=200,
             max_length=64)
ALL_VARIANTS = ["sts_icl", "sts_act", "sts_sq", "raw_act", "signed_usage", "forgetting_minus_transfer",
                "decoder_projection"]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def targets():
    return {d: domain_texts(d, 30) for d in DOMAINS}


def sae():
    return TinySAE(32, 64, hook_name="blocks.1.hook_resid_post")


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def text_nll(model, tokenizer, texts):
    """An independent metric: mean token NLL of a few fixed texts."""
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        return float(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss)


class MetricSpy:
    def __init__(self, tokenizer):
        self.calls = []
        self.tokenizer = tokenizer

    def __call__(self, model, tokenizer, domain):
        assert tokenizer is self.tokenizer and not model.training
        self.calls.append(domain)
        return text_nll(model, tokenizer, domain_texts(domain, 4, seed=9))


def test_lora_two_seeds_end_to_end(tmp_path, tokenizer):
    model = make_model("llama")
    before = weights(model)
    spy = MetricSpy(tokenizer)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = validate(model, tokenizer, sae(), domain_texts("law", 64, seed=3), targets(), FAST, method="lora",
                          seeds=(0, 1), metric=spy, output_dir=tmp_path / "val", **CHEAP)
    # validate chose to re-check at the end only: no warning tells the user to change a setting they never made
    assert not [w for w in caught if "save_strategy='no'" in str(w.message)]
    assert isinstance(result, ValidationResult)
    assert_same_weights(model, before)  # the user's model is untouched

    sts_dir = tmp_path / "val" / "sts"
    saved = json.loads((sts_dir / "validation.json").read_text())
    assert saved["format"] == "sts-validation/1" and saved["method"] == "lora" and saved["seeds"] == [0, 1]
    assert saved["variants"] == ALL_VARIANTS and saved["measures"] == ["nll", "metric"]
    assert set(saved["domains"]) == set(DOMAINS)
    assert saved["training"]["steps"] == 2 and saved["training"]["lora_rank"] == 8
    assert saved["training"]["lora_target_modules"]  # peft's default for llama
    # measured (what `sts report` plots): |relative NLL change|, mean over seeds
    for d in DOMAINS:
        expected = sum(abs(s["nll_delta_rel"][d]) for s in saved["per_seed"]) / 2
        assert saved["measured"][d] == pytest.approx(expected)
    assert len(saved["per_seed"]) == 2
    for seed, record in zip((0, 1), saved["per_seed"]):
        assert record["seed"] == seed
        for d in DOMAINS:
            rel = (record["nll_after"][d] - record["nll_before"][d]) / record["nll_before"][d]
            assert record["nll_delta_rel"][d] == pytest.approx(rel)
            assert record["nll_delta_abs"][d] == pytest.approx(record["nll_after"][d] - record["nll_before"][d])
            assert set(record["scores"][d]) == set(ALL_VARIANTS)
        assert 0 <= record["overlap"]["count"] <= 8 and record["overlap"]["n_shifted"] == 8
        assert len(record["forecast_latents"]) == 8 and len(record["actual_latents"]) == 8
        for measure in ("nll", "metric"):
            for variant in ALL_VARIANTS:
                for kind in ("abs", "signed"):
                    for stat in ("pearson", "spearman"):
                        entry = record["correlations"][measure][variant][kind][stat]
                        assert set(entry) == {"r", "p", "p_method", "ci", "n"} and entry["n"] == 4
                        if entry["r"] is not None:
                            assert -1 <= entry["r"] <= 1 and 0 <= entry["p"] <= 1
                            assert entry["p_method"] == "exact permutation"  # 4 domains: every pairing
                            assert entry["ci"] is None  # too few domains for a bootstrap
    # the two seeds sampled differently (forecast and held-out texts)
    assert saved["per_seed"][0]["nll_before"] != saved["per_seed"][1]["nll_before"]
    for measure in ("nll", "metric"):
        for variant in ALL_VARIANTS:
            for kind in ("abs", "signed"):
                for stat in ("pearson", "spearman"):
                    agg = saved["correlations"][measure][variant][kind][stat]
                    rs = [s["correlations"][measure][variant][kind][stat]["r"] for s in saved["per_seed"]]
                    assert agg["values"] == rs
                    if None not in rs:
                        assert agg["mean"] == pytest.approx(sum(rs) / 2) and agg["std"] is not None
    assert saved["overlap"]["n"] == 2 and saved["overlap"]["n_shifted"] == 8
    # how precisely each change was measured, and what that allows any forecast
    for record in saved["per_seed"]:
        errors = record["nll_delta_se"]
        assert set(errors) == set(DOMAINS) and all(e is not None and e > 0 for e in errors.values())
        assert record["noise_ceiling"] == pytest.approx(
            noise_ceiling([record["nll_delta_rel"][d] for d in DOMAINS], [errors[d] for d in DOMAINS]))
    ceilings = [s["noise_ceiling"] for s in saved["per_seed"]]
    assert None not in ceilings and all(0 <= c <= 1 for c in ceilings)
    assert saved["noise_ceiling"] == pytest.approx(sum(ceilings) / 2)
    assert "measurement noise" in result.table()
    assert "a perfect forecast could expect" in (tmp_path / "val" / "sts" / "report.html").read_text()

    # the user metric: before once per domain (untouched weights), after once per domain and seed
    assert sorted(spy.calls) == sorted(list(DOMAINS) * 3)
    for d in DOMAINS:
        untouched = text_nll(model, tokenizer, domain_texts(d, 4, seed=9))
        for record in saved["per_seed"]:
            assert record["metric_before"][d] == pytest.approx(untouched)
            assert record["metric_after"][d] != pytest.approx(untouched)
            assert record["metric_delta"][d] == pytest.approx(record["metric_after"][d] - untouched)

    assert (sts_dir / "validation.png").stat().st_size > 1000
    assert (sts_dir / "forecast.json").exists() and (sts_dir / "report.html").exists()
    page = (sts_dir / "report.html").read_text()  # the report quotes the validation's own correlation
    mean_r = saved["correlations"]["nll"]["sts_icl"]["abs"]["pearson"]["mean"]
    assert "correlations.nll.sts_icl.abs" in page and f"Pearson r = {mean_r:.2f}" in page
    assert "Forecast vs measured" in (sts_dir / "report.md").read_text()
    for seed in (0, 1):
        assert (tmp_path / "val" / f"seed-{seed}" / "sts" / "history.jsonl").exists()
    # the folder's report is the first seed's run: its train-start warnings too (it said "No warnings.")
    first = tmp_path / "val" / "seed-0" / "sts"
    assert (sts_dir / "settings.json").read_bytes() == (first / "settings.json").read_bytes()
    said = [line for line in (first / "report.md").read_text().splitlines() if line.startswith("- ")]
    assert all(line in (sts_dir / "report.md").read_text() for line in said)
    table = result.table()
    assert "STS_icl" in table and "raw_act" in table and "±" in table and "overlap" in table
    # a verdict a person can act on: the ranking score's |change| Pearson r, as correlation() gives it, vs the goal
    r = result.correlation("sts_icl", "abs", "pearson")
    held = "meets it" if r >= 0.85 else "short of it"
    assert (f"verdict: STS_icl, the forecast's ranking score, orders these 4 domains by the size of their change at "
            f"Pearson r {r:+.2f}, mean over 2 seeds (the method's goal 0.85): {held} on this setup") in table
    mean_r = saved["correlations"]["nll"]["sts_icl"]["abs"]["pearson"]["mean"]
    assert result.correlation("sts_icl", "abs", "pearson") == mean_r
    loaded = ValidationResult.load(sts_dir)  # a notebook gets the result back from its file
    assert loaded.table() == table and loaded.correlation("sts_icl", "abs", "pearson") == mean_r


def test_full_fine_tune_single_seed_skips_uncomputed_variants(tmp_path, tokenizer):
    model = make_model("llama")
    before = weights(model)
    config = {**FAST, "compute_icl": False, "ranking": "sts_act"}
    result = validate(model, tokenizer, sae(), domain_texts("law", 64, seed=3), targets(), config, method="full",
                      seeds=0, output_dir=tmp_path / "val", **{**CHEAP, "steps": 3}, recheck_steps=1)
    assert_same_weights(model, before)
    saved = json.loads((tmp_path / "val" / "sts" / "validation.json").read_text())
    assert saved["variants"] == ALL_VARIANTS[1:] and saved["measures"] == ["nll"]
    assert "sts_icl" not in saved["per_seed"][0]["correlations"]["nll"]
    assert saved["training"]["method"] == "full" and saved["training"]["lora_rank"] is None
    record = saved["per_seed"][0]
    assert any(abs(v) > 1e-4 for v in record["nll_delta_rel"].values())  # training really changed the model
    agg = saved["correlations"]["nll"]["sts_act"]["abs"]["pearson"]
    assert agg["std"] is None and agg["n"] in (0, 1)  # one seed: no spread
    assert "metric_before" not in saved["mean"] and record["metric_before"] is None
    assert "no interval: a bootstrap needs 7 domains or more" in result.table()  # a single seed of 4 domains
    # recheck_steps=1: the NLL change at every step, the last one equal to the final measurement
    trajectory = record["trajectory"]
    assert [t["step"] for t in trajectory] == [1, 2, 3]
    assert trajectory[-1]["nll_delta_rel"] == pytest.approx(record["nll_delta_rel"])
    assert trajectory[0]["nll_delta_rel"] != trajectory[-1]["nll_delta_rel"]
    for point in trajectory:  # each re-check's change keeps its 95% interval (early-warning studies read it)
        for domain, (low, high) in point["nll_delta_ci"].items():
            assert low <= point["nll_delta_rel"][domain] <= high


def test_lora_in_place_leaves_the_model_as_it_was(tmp_path, tokenizer, monkeypatch):
    model = make_model("llama").eval()
    model.model.layers[0].train()  # a mode of the user's own: kept
    model.lm_head.weight.requires_grad_(False)
    before, modes = weights(model), {name: m.training for name, m in model.named_modules()}
    assert model.config.use_cache

    def as_it_was():
        assert type(model).__name__ == "LlamaForCausalLM"
        assert not any("lora" in name for name, _ in model.named_modules())
        assert_same_weights(model, before)
        assert not model.lm_head.weight.requires_grad and model.model.embed_tokens.weight.requires_grad
        assert {name: m.training for name, m in model.named_modules()} == modes  # the Trainer left them training
        assert model.config.use_cache  # the Trainer turned it off

    validate(model, tokenizer, sae(), domain_texts("law", 64, seed=3), targets(), FAST, method="lora",
             copy_model=False, output_dir=tmp_path / "val", plot=False, report=False, **CHEAP)
    as_it_was()
    # a Ctrl-C while PEFT wraps the layers (its third) leaves none of its adapters in the model
    from peft.tuners.lora import LoraModel

    wrap, calls = LoraModel._create_and_replace, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return wrap(self, *args, **kwargs)

    monkeypatch.setattr(LoraModel, "_create_and_replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        validate(model, tokenizer, sae(), domain_texts("law", 64, seed=3), targets(), FAST, method="lora",
                 copy_model=False, output_dir=tmp_path / "val2", plot=False, report=False, **CHEAP)
    as_it_was()


def test_bad_inputs_fail_before_training(tmp_path, tokenizer, monkeypatch):
    import importlib

    module = importlib.import_module("sts_callback.validation.validate")  # the package's `validate` is the function

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(module, "_train_one_seed", no_training)
    model = make_model("llama")
    train = domain_texts("law", 16)

    def run(**changes):
        values = dict(model=model, tokenizer=tokenizer, sae=sae(), train_data=train, targets=targets(), config=FAST,
                      output_dir=tmp_path / "bad")
        values.update(changes)
        return validate(**values)

    with pytest.raises(STSConfigError, match="method='sgd'.*use 'lora'.*or 'full'"):
        run(method="sgd")
    with pytest.raises(STSConfigError, match="needs at least one seed"):
        run(seeds=())
    with pytest.raises(STSConfigError, match="repeats a seed"):
        run(seeds=(1, 1))
    for seed in (-1, 2 ** 32):  # numpy refused it after the earlier seeds had trained, losing their results
        with pytest.raises(STSConfigError, match=rf"holds {seed}; a seed must be in 0..2\*\*32 - 1"):
            run(seeds=(0, seed))
    with pytest.raises(STSConfigError, match=r"steps=\.\.\.\) must be an integer >= 1"):
        run(steps=0)
    with pytest.raises(STSConfigError, match="learning_rate"):
        run(learning_rate=-1.0)
    with pytest.raises(STSConfigError, match="at least 3; got 2"):
        run(targets={"law": domain_texts("law"), "food": domain_texts("food")})
    with pytest.raises(STSConfigError, match="must be a callable"):
        run(metric="accuracy")
    with pytest.raises(STSConfigError, match="copy_model=False"):
        run(method="full", copy_model=False, seeds=(0, 1))
    with pytest.raises(STSConfigError, match="n_shifted"):
        run(config={"n_shifted": 0})
    # a device the machine lacks, a per-domain metric missing a target: said before the model's copy and training
    with pytest.raises(STSConfigError, match="device='cuda:7'.*(without CUDA|no CUDA GPU|GPU\\(s\\) are visible)"):
        run(device="cuda:7")
    with pytest.raises(STSConfigError, match="device='gpu'.*not a device name"):
        run(device="gpu")
    item = {"question": "q", "choices": ["a", "b"], "answer": 0}
    with pytest.raises(STSInputError, match=r"no items for target domain\(s\) \['chem', 'food', 'sport'\]"):
        run(metric=multiple_choice_accuracy({"law": [item]}))
    with pytest.raises(STSInputError, match="no answers"):
        run(train_data=[{"prompt": "what is law ?"}] * 4)
    from peft import LoraConfig, get_peft_model

    with pytest.raises(STSInputError, match="pass the base model"):
        run(model=get_peft_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"])))


def test_correlation_statistics_and_degenerate_inputs():
    from scipy import stats

    x, y = [0.1, 0.4, 0.2, 0.9, 0.5, 0.3, 0.7], [1.0, 2.5, 1.1, 4.0, 3.0, 1.2, 2.0]
    entry = correlation(x, y, "pearson", n_resamples=500, seed=1)
    assert entry["r"] == pytest.approx(stats.pearsonr(x, y)[0])
    assert entry["p_method"] == "exact permutation"  # 7 points: every pairing, not the t-distribution
    low, high = entry["ci"]
    assert low < entry["r"] < high <= 1.0
    assert correlation(x, y, "pearson", n_resamples=500, seed=1) == entry  # seeded
    rho = correlation(x, y, "spearman", n_resamples=100)
    assert rho["r"] == pytest.approx(stats.spearmanr(x, y)[0])
    # constant vectors: no correlation, no crash, null in JSON
    for degenerate in (correlation([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]), correlation([1.0, 2.0, 3.0], [5.0] * 3)):
        assert degenerate == {"r": None, "p": None, "p_method": None, "ci": None, "n": 3}
    # fewer than 7 points: a bootstrap's resamples are often two distinct points (r = +-1 by construction), so no
    # interval; a perfect r of 4 points read [1.00, 1.00] beside its exact p of 0.083
    perfect = correlation([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.5], n_resamples=300)
    assert perfect["r"] > 0.99 and perfect["p"] == pytest.approx(2 / 24)
    assert perfect["ci"] is None and correlation(x[:6], y[:6], n_resamples=300)["ci"] is None
    assert _mean_std([None, None]) == {"mean": None, "std": None, "n": 0, "values": [None, None]}
    assert _mean_std([0.5, None])["mean"] == 0.5 and _mean_std([0.5, None])["std"] is None
    assert json_safe({"a": [float("nan"), 1.0]}) == {"a": [None, 1.0]}


def test_p_values_of_few_domains_come_from_every_pairing():
    """With 3 domains a perfect rank correlation is one of 6 pairings: p = 1/3 (two-sided), not scipy's p = 0."""
    import math

    from scipy import stats

    for statistic in ("spearman", "pearson"):
        perfect = correlation([0.1, 0.2, 0.3], [1.0, 2.0, 4.0], statistic, n_resamples=0)
        assert perfect["p"] == pytest.approx(1 / 3) and perfect["p_method"] == "exact permutation"
    assert correlation([0.3, 0.2, 0.1], [1.0, 2.0, 4.0], "spearman", n_resamples=0)["p"] == pytest.approx(1 / 3)
    x, y = [0.1, 0.4, 0.2, 0.9, 0.5, 0.3, 0.8, 0.7], [1.0, 2.5, 1.1, 4.0, 3.0, 0.2, 2.0, 3.5]
    for statistic, scipy_statistic in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr)):
        exact = stats.permutation_test((x,), lambda a: scipy_statistic(a, y)[0], permutation_type="pairings",
                                       n_resamples=math.factorial(len(x)))
        entry = correlation(x, y, statistic, n_resamples=0)
        assert entry["p"] == pytest.approx(exact.pvalue) and entry["p_method"] == "exact permutation"
    many = [0.1, 0.4, 0.2, 0.9, 0.5, 0.3, 0.8, 0.7, 0.6, 0.05]  # beyond a few domains: scipy's own p
    other = [1.0, 2.5, 1.1, 4.0, 3.0, 0.2, 2.0, 3.5, 2.2, 0.3]
    entry = correlation(many, other, "pearson", n_resamples=0)
    assert entry["p"] == pytest.approx(stats.pearsonr(many, other)[1]) and entry["p_method"] == "t-distribution"


def _columns_end_at_the_same_place(lines: list[str]) -> None:
    """Every line's cells (separated by 2+ spaces) after the first end at the header's column ends."""
    import re

    from sts_callback.pipelines.forecast import display_width  # terminal columns: a CJK character takes two

    ends = [[display_width(line[:m.end()]) for m in re.finditer(r"\S+(?: \S+)*", line)][1:] for line in lines]
    assert all(e == ends[0] for e in ends), "\n".join(lines)


@pytest.mark.parametrize("wide", [False, True])
def test_console_table_columns_line_up_and_few_domains_never_print_p_below_0001(wide):
    from fake_validation import fake_validation

    names = ("法律 domain\t2" if wide else "my domain/ü é", "law", "food")  # in the order of their signed change: rank correlations of ±1
    scores = {d: {v: 0.001 * (i + 1) * (j + 1) * (-1) ** j for j, v in enumerate(ALL_VARIANTS)}
              for i, d in enumerate(names)}
    result = fake_validation([scores], [{"law": -0.0045, names[0]: -0.0046, "food": 0.0016}],
                             training_args={"weight_decay": 0.0})
    table = result.table().splitlines()
    assert "TrainingArguments also set: weight_decay=0.0" in table[1]  # the recipe change is said with it
    domain_table = table[table.index(next(line for line in table if line.startswith("domain"))):][:5]
    del domain_table[1]  # the rule
    _columns_end_at_the_same_place(domain_table)
    start = table.index(next(line for line in table if line.startswith("variant")))
    rows = [table[start]] + table[start + 2:start + 2 + len(ALL_VARIANTS)]
    assert [row.split("  ")[0].strip() for row in rows[1:]] == [
        "STS_icl", "STS_act", "STS_sq", "raw_act", "signed_use", "forget-xfer", "dec_proj"]
    _columns_end_at_the_same_place(rows)
    assert "p<0.001" not in "\n".join(table) and "p=0.333" in "\n".join(table)  # perfect ranks of 3: p = 1/3
    assert "p: exact permutation test" in table[start - 1]


def test_console_table_gives_intervals_only_where_a_bootstrap_can_say_something():
    """A single seed's correlations show their bootstrap interval from 7 domains on; with fewer the table says why
    none is shown. The heading names a DPO run as such, and a change too small for two decimals keeps its digits."""
    from fake_validation import fake_validation

    def table(n: int, trainer: str = "Trainer") -> str:
        names = [f"d{i}" for i in range(n)]
        scores = {d: {v: 0.01 * (i + 1) + 0.001 * j for j, v in enumerate(ALL_VARIANTS)} for i, d in enumerate(names)}
        changes = {d: 0.01 * (i + 1) * (-1) ** (i // 2) for i, d in enumerate(names)}
        changes[names[0]] = -3e-6
        return fake_validation([scores], [changes], n_resamples=200, trainer=trainer).table()

    seven, four = table(7), table(4, "DPOTrainer")
    assert "(r [95% bootstrap CI] p" in seven and "no interval" not in seven
    assert "[" in seven.split("correlation across")[1]
    assert "no interval: a bootstrap needs 7 domains or more" in four and "[" not in four.split("correlation across")[1]
    assert four.startswith("STS validation: LoRA (r=8) DPO, ")
    assert seven.startswith("STS validation: LoRA (r=8) fine-tune")
    assert "-<0.001%" in seven and "-0.00" not in seven  # a tiny fall: no zero with a sign


def test_console_table_says_why_a_measure_has_no_correlation():
    """A metric that moved alike on every domain (e.g. accuracy on a few items, unchanged) gave a table of n/a with no
    reason: the table now says which side has no spread."""
    from fake_validation import fake_validation

    names = ["law", "food", "chem", "code"]
    scores = {d: {v: 0.01 * (i + 1) for v in ALL_VARIANTS} for i, d in enumerate(names)}
    result = fake_validation([scores], [{d: 0.02 for d in names}])
    assert "n/a: the held-out NLL changed alike on every domain" in result.table()
    flat = {d: {v: 0.5 for v in ALL_VARIANTS} for d in names}
    result = fake_validation([flat], [{d: 0.01 * i for i, d in enumerate(names)}])
    assert "n/a: every variant's score is the same on every domain" in result.table()
    moved = fake_validation([scores], [{d: 0.01 * i for i, d in enumerate(names)}])
    assert "n/a:" not in moved.table()


@pytest.mark.parametrize("training_args, words", [
    ({"max_steps": 5, "learning_rate": 0.05}, "pass validate(steps=..., learning_rate=...)"),
    ({"num_train_epochs": 3}, "num_train_epochs would be ignored"),
    ({"per_device_train_batch_size": 2}, "per_device_train_batch_size -> batch_size"),
    ({"seed": 3}, "seed -> seeds"),
    ({"output_dir": "elsewhere"}, "output_dir -> output_dir"),
    ({"use_cpu": True}, "use_cpu -> device"),
    ({"label_names": ["x"]}, "validate sets itself"),
    ({"bf17": True}, "did you mean bf16?"),
    ({"eval_strategy": "steps"}, "need an eval_dataset"),  # failed in transformers after the model loaded
    ({"load_best_model_at_end": True}, "need an eval_dataset"),
])
def test_training_args_that_override_validates_own_settings_are_refused_before_any_model_work(training_args, words):
    """training_args applied last used to override steps / learning_rate while validation.json and the table kept
    the settings' values; such keys (and unknown ones) now fail when the settings are built, before any model."""
    with pytest.raises(STSConfigError, match=words.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        validate(None, None, None, ["x"], {"a": ["x"], "b": ["y"], "c": ["z"]}, training_args=training_args)
    with pytest.raises(STSConfigError, match="training_args"):
        ValidationConfig.from_dict({"training_args": training_args})
    assert ValidationConfig(training_args={"weight_decay": 0.0, "bf16": False}).training_args == {
        "weight_decay": 0.0, "bf16": False}  # the recipe's other fields may still be changed


def test_noise_ceiling_is_what_a_perfect_forecast_reaches_against_noisy_measurements():
    import numpy as np

    rng = np.random.default_rng(0)
    true = np.linspace(-0.03, 0.03, 10)  # 10 domains' true changes, spread (sd) 2 points
    for error in (0.005, 0.01, 0.015):  # measured with a standard error of 0.5, 1 and 1.5 points
        errors = np.full(10, error)
        reached, ceilings = [], []
        for _ in range(2000):
            measured = true + rng.normal(0, errors)
            reached.append(np.corrcoef(true, measured)[0, 1])
            ceilings.append(noise_ceiling(measured, errors))
        assert np.median(ceilings) == pytest.approx(np.median(reached), abs=0.05)
    assert noise_ceiling(true, np.zeros(10)) == pytest.approx(1.0)
    assert noise_ceiling(true, np.full(10, 1.0)) == 0.0  # noise far beyond the spread: nothing to forecast
    # not sayable: unknown or infinite errors, too few domains, no spread
    assert noise_ceiling(true, [None] + [0.01] * 9) is None
    assert noise_ceiling(true, [float("inf")] * 10) is None
    assert noise_ceiling(true[:2], errors[:2]) is None
    assert noise_ceiling([0.01] * 5, [0.001] * 5) is None


def test_a_noise_ceiling_below_the_bar_never_prints_as_the_bar():
    from types import SimpleNamespace

    from sts_callback.validation.validate import ValidationResult

    result = SimpleNamespace(noise_ceiling=0.8455, per_seed=[SimpleNamespace(nll_delta_se={"law": 0.01})],
                             training={"loss_tokens": 120})
    line = ValidationResult._noise_lines(result)[1]
    assert "Pearson r of about 0.84 with" in line and "raise loss_tokens, now 120" in line  # was "about 0.85"


def independent_choice_score(model, tokenizer, question, choice):
    """Mean log-probability of the choice's tokens, one unpadded forward per choice."""
    prompt = tokenizer(f"{question}\nAnswer:")["input_ids"]
    cont = tokenizer(f" {choice}", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    return float(sum(logprobs[len(prompt) - 1 + i, t] for i, t in enumerate(cont)) / len(cont))


def test_multiple_choice_accuracy(tokenizer):
    model = make_model("llama")
    question, choices = "what is the law", ["court judge appeal", "sugar", "python code function return"]
    scores = [independent_choice_score(model, tokenizer, question, c) for c in choices]
    best = max(range(3), key=lambda i: scores[i])
    assert choice_scores(model, tokenizer, {"question": question, "choices": choices, "answer": 0}) == \
        pytest.approx(scores, abs=1e-5)  # batched with padding = one by one
    right = {"question": question, "choices": choices, "answer": best}
    wrong = {"question": question, "choices": choices, "answer": (best + 1) % 3}
    metric = multiple_choice_accuracy({"law": [right], "food": [wrong], "chem": [right, wrong]})
    assert metric(model, tokenizer, "law") == 1.0
    assert metric(model, tokenizer, "food") == 0.0
    assert metric(model, tokenizer, "chem") == 0.5
    with pytest.raises(STSInputError, match="no items for domain 'sport'"):
        metric(model, tokenizer, "sport")
    shared = multiple_choice_accuracy([right, right, wrong])
    assert shared(model, tokenizer, "anything") == pytest.approx(2 / 3)
    from datasets import Dataset  # as the README says; was "needs a non-empty list" for a 3-row Dataset

    assert multiple_choice_accuracy(Dataset.from_list([right, right, wrong]))(model, tokenizer, "x") == \
        pytest.approx(2 / 3)
    with pytest.raises(STSInputError, match="answer=3"):
        multiple_choice_accuracy([{"question": "q", "choices": ["a", "b"], "answer": 3}])
    import numpy as np  # pandas rows (df.to_dict("records")) hold numpy integers: indices all the same

    assert multiple_choice_accuracy([{**right, "answer": np.int64(best)}])(model, tokenizer, "x") == 1.0
    with pytest.raises(STSInputError, match="at least two choices"):
        multiple_choice_accuracy([{"question": "q", "choices": ["a"], "answer": 0}])


# --------------------------------------------------------------------------- CLI
def test_cli_help_and_example(capsys):
    from sts_callback.tools.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--help"])
    assert exit_info.value.code == 0
    assert "--seeds" in capsys.readouterr().out
    assert main(["validate", "--example"]) == 0
    example = yaml.safe_load(capsys.readouterr().out)
    assert {"model", "sae", "train_data", "targets", "validation"} <= set(example)
    assert len(example["targets"]) >= 3


def test_cli_validate_run(tmp_path, tokenizer, capsys):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from sts_callback.tools.cli import main

    make_model("llama").save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    torch.manual_seed(0)
    saved_sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64,
                                              metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post")))
    with torch.no_grad():
        for p in saved_sae.parameters():
            p.normal_(0, 0.3)
    saved_sae.save_model(tmp_path / "sae")
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"prompt": t, "completion": t})
                                                     for t in domain_texts("law", 40, seed=3)))
    items = [{"question": "what is the law", "choices": ["court judge", "sugar"], "answer": 0}] * 2
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(item) for item in items))
    config = {"model": str(tmp_path / "model"), "sae": str(tmp_path / "sae"),
              "train_data": str(tmp_path / "train.jsonl"),
              "targets": {d: domain_texts(d, 30) for d in ("law", "food", "chem")},
              "validation": {"steps": 2, "batch_size": 4, "learning_rate": "1e-2", "loss_tokens": 120,
                             "recheck_tokens": 150, "n_resamples": 100, "max_length": 64},
              "multiple_choice": {d: str(tmp_path / "mc.jsonl") for d in ("law", "food", "chem")},
              "options": FAST, "output_dir": str(tmp_path / "out")}
    path = tmp_path / "validate.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["validate", str(path), "--no-progress", "--method", "full", "--set", "seed=2"]) == 0
    printed = capsys.readouterr().out
    assert "STS validation: full fine-tune, 2 steps" in printed and "wrote" in printed
    saved = json.loads((tmp_path / "out" / "sts" / "validation.json").read_text())
    assert saved["method"] == "full" and saved["training"]["learning_rate"] == 0.01
    assert saved["config"]["seed"] == 2 and saved["measures"] == ["nll", "metric"]
    assert all(0 <= v <= 1 for v in saved["per_seed"][0]["metric_before"].values())

    path.write_text(yaml.safe_dump({**config, "validation": {"stepz": 2}}))
    assert main(["validate", str(path)]) == 2
    assert "validation: unknown key(s) ['stepz']" in capsys.readouterr().err
    # DPO / GRPO fields are training_args of a config too; reward functions are imported before the model loads
    path.write_text(yaml.safe_dump({**config, "validation": {"training_args": {"beta": 0.5, "num_generations": 2}},
                                    "reward_funcs": [f"{tmp_path}/missing.py:reward"]}))
    assert main(["validate", str(path)]) == 2
    assert "reward function" in capsys.readouterr().err.strip().splitlines()[-1]
    one_domain = {k: v for k, v in config.items() if k != "multiple_choice"}
    path.write_text(yaml.safe_dump({**one_domain, "targets": {"law": domain_texts("law")}}))
    assert main(["validate", str(path)]) == 2
    assert "needs at least 3" in capsys.readouterr().err
    assert main(["validate", str(path), "--steps", "0"]) == 2
    assert "--steps must be an integer >= 1" in capsys.readouterr().err  # the flag given, not validate(steps=...)


def test_preference_pairs_are_validated_with_dpo(tmp_path, tokenizer):
    """DPO data are trained as a DPO user trains them, so the forecast checked is the callback's chosen - rejected
    one (before: SFT on the chosen answers, against the in-context forecast)."""
    law, food = domain_texts("law", 32, seed=3), domain_texts("food", 32, seed=3)
    pairs = [{"prompt": " ".join(a.split()[:3]), "chosen": " " + " ".join(a.split()[3:]), "rejected": " " + b}
             for a, b in zip(law, food)]
    model = make_model("llama")
    before = weights(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        validate(model, tokenizer, sae(), pairs, targets(), FAST, method="lora", seeds=0,
                 output_dir=tmp_path / "val", plot=False, report=False, training_args={"beta": 0.5}, **CHEAP)
    # TRL's configs default to activation checkpointing under its deprecated name; ours sets the new one (TRL's own
    # calls of the deprecated gradient_checkpointing_enable still warn: not ours)
    assert not [w for w in caught if w.filename.endswith("training_args.py")]
    assert_same_weights(model, before)
    saved = json.loads((tmp_path / "val" / "sts" / "validation.json").read_text())
    assert saved["training"]["trainer"] == "DPOTrainer" and saved["training"]["training_args"] == {"beta": 0.5}
    assert saved["training"]["completion_only_loss"] is None  # SFT's setting: DPO trains completions by its rules
    forecast = json.loads((tmp_path / "val" / "sts" / "forecast.json").read_text())
    assert forecast["settings"]["shift"] == "chosen_vs_rejected" and forecast["settings"]["preference_pairs"] > 0
    record = saved["per_seed"][0]
    assert any(abs(v) > 1e-5 for v in record["nll_delta_rel"].values())  # DPO really changed the model
    assert "sts_icl" in record["correlations"]["nll"]
    # DPOConfig's own fields are for preference data only, said before any model work
    with pytest.raises(STSConfigError, match=r"sets \['beta'\], fields of another TRL trainer's config: this "
                                             r"training is validated with Trainer"):
        validate(model, tokenizer, sae(), law, targets(), FAST, output_dir=tmp_path / "sft",
                 training_args={"beta": 0.5}, **CHEAP)
    with pytest.raises(STSConfigError, match=r"sets \['max_length'\].*validate\(max_length=\.\.\.\)"):
        validate(model, tokenizer, sae(), pairs, targets(), FAST, output_dir=tmp_path / "len",
                 training_args={"max_length": 32}, **CHEAP)


def test_dpo_validation_of_a_full_fine_tune_and_of_the_users_own_model(tmp_path, tokenizer):
    """A full fine-tune's reference is the policy as it starts (TRL reloaded it from config._name_or_path: an
    OSError for a model built in memory, another model's weights for one changed after loading); implicit-prompt
    chats are pairs too; the user's model keeps its dropout (TRL's disable_dropout set it to 0)."""
    law, food = domain_texts("law", 32, seed=3), domain_texts("food", 32, seed=3)
    chats = [{"chosen": [{"role": "user", "content": " ".join(a.split()[:3])}, {"role": "assistant", "content": a}],
              "rejected": [{"role": "user", "content": " ".join(a.split()[:3])}, {"role": "assistant", "content": b}]}
             for a, b in zip(law, food)]
    model = make_model("llama")
    assert not model.config._name_or_path
    validate(model, tokenizer, sae(), chats, targets(), FAST, method="full", seeds=0, output_dir=tmp_path / "full",
             plot=False, report=False, **CHEAP)
    forecast = json.loads((tmp_path / "full" / "sts" / "forecast.json").read_text())
    assert forecast["settings"]["shift"] == "chosen_vs_rejected"
    gpt2 = make_model("gpt2").train()
    dropouts = {n: m.p for n, m in gpt2.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert dropouts and all(p > 0 for p in dropouts.values())
    validate(gpt2, tokenizer, sae(), chats, targets(), FAST, method="lora", seeds=0, copy_model=False,
             output_dir=tmp_path / "own", plot=False, report=False, **CHEAP)
    assert {n: m.p for n, m in gpt2.named_modules() if isinstance(m, torch.nn.Dropout)} == dropouts
    assert gpt2.training


def test_prompts_with_reward_functions_are_validated_with_grpo(tmp_path, tokenizer):
    """GRPO users check the rollout forecast on their own setup: the prompts trained with GRPOTrainer and their
    reward functions (before: prompt-only data were refused as having no answers)."""
    calls = []

    def law_words(completions, **kwargs):
        calls.append(len(completions))
        return [float(sum(w in c for w in ("court", "statute", "contract"))) + len(c) / 100 for c in completions]

    prompts = [{"prompt": " ".join(t.split()[:4])} for t in domain_texts("law", 32, seed=3)]
    grpo = {"num_generations": 2, "max_completion_length": 6, "temperature": 1.2}
    config = {**FAST, "rollout_prompts": 4, "rollout_max_tokens": 6}
    validate(make_model("llama"), tokenizer, sae(), prompts, targets(), config, method="lora", seeds=0,
             output_dir=tmp_path / "val", plot=False, report=False, reward_funcs=[law_words],
             training_args=grpo, **{**CHEAP, "batch_size": 4})
    saved = json.loads((tmp_path / "val" / "sts" / "validation.json").read_text())
    assert saved["training"]["trainer"] == "GRPOTrainer" and saved["training"]["training_args"] == grpo
    forecast = json.loads((tmp_path / "val" / "sts" / "forecast.json").read_text())
    assert forecast["settings"]["shift"] == "reward_weighted" and forecast["settings"]["rollouts"]["prompts"] == 4
    assert calls  # the rewards scored the forecast's rollouts and the training's
    record = saved["per_seed"][0]
    assert any(abs(v) > 1e-6 for v in record["nll_delta_rel"].values())
    with pytest.raises(STSConfigError, match="beta=0.1 on every weight reloads its reference model"):
        validate(make_model("llama"), tokenizer, sae(), prompts, targets(), config, method="full", seeds=0,
                 output_dir=tmp_path / "full", reward_funcs=[law_words], training_args={**grpo, "beta": 0.1},
                 **CHEAP)
    with pytest.raises(STSConfigError, match=r"\['num_generations'\], fields of another TRL trainer's config"):
        validate(make_model("llama"), tokenizer, sae(), domain_texts("law", 32), targets(), config,
                 output_dir=tmp_path / "sft", training_args={"num_generations": 2}, **CHEAP)


def test_records_of_two_formats_and_injected_adapters_are_named(tmp_path, tokenizer):
    """Preference records mixing text and chat messages gave pyarrow's raw ArrowInvalid; adapters injected into
    a plain model (inject_adapter_in_model) were stripped by the restore of copy_model=False."""
    from peft import LoraConfig, inject_adapter_in_model

    law, food = domain_texts("law", 8), domain_texts("food", 8)
    mixed = [{"prompt": "q", "chosen": a, "rejected": b} for a, b in zip(law, food)]
    mixed[3] = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": law[3]}],
                "rejected": [{"role": "assistant", "content": food[3]}]}
    with pytest.raises(STSInputError, match="a column holds values of different types"):
        validate(make_model("llama"), tokenizer, sae(), mixed, targets(), FAST, output_dir=tmp_path / "mixed",
                 **CHEAP)
    injected = inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"]), make_model("llama"))
    with pytest.raises(STSInputError, match="got a model with PEFT adapters"):
        validate(injected, tokenizer, sae(), law, targets(), FAST, copy_model=False, output_dir=tmp_path / "own",
                 **CHEAP)


def folders_the_cli_checks_before_the_model(tmp_path, monkeypatch) -> dict[str, str]:
    """A model folder (never loaded: load_model fails the test) and a real SAE folder, as config entries."""
    import sts_callback.tools.cli as cli
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(cli, "load_model", refuse)
    StandardSAE(StandardSAEConfig(d_in=32, d_sae=64, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post"))
                ).save_model(tmp_path / "sae")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    return {"model": str(tmp_path / "model"), "sae": str(tmp_path / "sae"), "options": {"n_shifted": 8}}  # <= 64


def test_cli_validate_refuses_another_trainers_fields_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """DPOConfig / GRPOConfig fields on SFT data were refused inside validate(), after the model had loaded."""
    import sts_callback.tools.cli as cli

    config = {**folders_the_cli_checks_before_the_model(tmp_path, monkeypatch), "train_data": domain_texts("law", 8),
              "targets": {d: domain_texts(d, 5) for d in ("law", "food", "chem")},
              "validation": {"training_args": {"beta": 0.5}}}
    path = tmp_path / "validate.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"`validation: training_args` in {path} sets ['beta'], fields of another TRL trainer's config" in err
    # the config's keys and the flags given, not the Python API's validate(steps=...), in the CLI's errors
    config["validation"] = {"seeds": [1, 1]}
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["validate", str(path), "--steps", "3"]) == 2
    assert f"`validation: seeds` in {path} repeats a seed" in capsys.readouterr().err
    config["validation"] = {}
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["validate", str(path), "--steps", "0"]) == 2
    assert "--steps must be an integer >= 1" in capsys.readouterr().err
    config["validation"] = {"training_args": {"max_steps": 5, "learning_rate": 1e-3}}  # two settings: both named
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["validate", str(path)]) == 2
    assert f"pass `validation: learning_rate` and `validation: steps` in {path}" in capsys.readouterr().err


@pytest.mark.parametrize("values, words", [
    ({"completion_only_loss": "false"}, "completion_only_loss='false'\\) must be true or false"),  # read as True
    ({"copy_model": 0}, "copy_model=0\\) must be true or false"),
    ({"lora_target_modules": 5}, "lora_target_modules=5\\) must be a module name"),  # TypeError in peft
    ({"lora_target_modules": []}, "lora_target_modules=\\[\\]\\) must be a module name"),
    ({"seeds": "0 1"}, "seeds='0 1'\\) must be an integer or a list of them"),  # was "needs at least one seed"
])
def test_settings_peft_or_truthiness_would_misread_are_refused_when_built(values, words):
    with pytest.raises(STSConfigError, match=words):
        ValidationConfig.from_dict(values)


def test_an_output_dir_that_is_a_file_is_refused_when_built(tmp_path):
    (tmp_path / "out").write_text("")  # was a bare NotADirectoryError once the model had been copied
    with pytest.raises(STSConfigError, match="is a file; name a folder"):
        ValidationConfig(output_dir=tmp_path / "out")


def test_lora_target_modules_that_match_no_module_fail_before_the_forecast(tokenizer):
    from sts_callback.pipelines.recipe import check_target_modules

    model = make_model("llama")
    check_target_modules(model, ["q_proj", "v_proj"])
    check_target_modules(model, "all-linear")
    with pytest.raises(STSConfigError, match=r"\['nonexistent_proj'\] match no module.*'q_proj'"):
        check_target_modules(model, ["q_proj", "nonexistent_proj"])


def test_a_malformed_multiple_choice_file_is_named_by_line(tmp_path):
    from sts_callback.core.multiple_choice import check_items

    item = {"question": "2 + 2 =", "choices": ["4", "5"], "answer": 0}
    jsonl = tmp_path / "mc.jsonl"
    jsonl.write_text(json.dumps(item) + "\n{not json\n")
    with pytest.raises(STSInputError, match="mc.jsonl, line 2, is not a JSON item"):  # was a JSONDecodeError
        check_items(jsonl, "mc")
    array = tmp_path / "mc.json"  # an indented array: was parsed line by line
    array.write_text(json.dumps([item, item], indent=2))
    assert len(check_items(array, "mc")) == 2
    separated = tmp_path / "sep.jsonl"  # a line separator inside a JSON string is no line end
    separated.write_text(json.dumps({**item, "question": "a\u2028b ="}, ensure_ascii=False) + "\n")
    assert check_items(separated, "mc")[0]["question"] == "a\u2028b ="


def test_a_validation_into_an_earlier_ones_folder_replaces_its_results_and_names_stale_seeds(tmp_path):
    """A rerun stopped part-way left the earlier run's validation.json and report beside the new run's forecast and
    history, which `sts report` combined; seed folders of earlier seeds stayed unsaid."""
    from sts_callback import STSDataWarning
    from sts_callback.validation.validate import _clear_earlier_validation

    sts = tmp_path / "sts"
    sts.mkdir()
    for name in ("validation.json", "validation.png", "report.html", "forecast.json", "history.jsonl",
                 "settings.json"):  # the train-start guard settings too: a stopped rerun left the old ones
        (sts / name).write_text("{}")
    (tmp_path / "seed-0").mkdir()
    (tmp_path / "seed-7").mkdir()
    with pytest.warns(STSDataWarning) as caught:
        _clear_earlier_validation(tmp_path, sts, [0, 1])
    assert list(sts.iterdir()) == []
    messages = " ".join(str(w.message) for w in caught)
    assert "earlier validation's results" in messages and "['seed-7']" in messages
    (sts / "forecast.json").write_text("{}")  # a callback run's folder (no validation.json) is left alone
    _clear_earlier_validation(tmp_path, sts, [0, 7])
    assert (sts / "forecast.json").exists()


def test_cli_validate_refuses_prompt_only_or_empty_training_data_before_the_model_loads(tmp_path, capsys,
                                                                                        monkeypatch):
    import sts_callback.tools.cli as cli

    folders = folders_the_cli_checks_before_the_model(tmp_path, monkeypatch)
    for train, words in (([{"prompt": "Q: 1 + 1 ="}] * 4, "has no answers (prompt-only data)"),
                         (["  ", ""] * 2, "Every training text is empty or blank")):
        config = {**folders, "train_data": train, "targets": {d: domain_texts(d, 5) for d in ("law", "food", "chem")}}
        path = tmp_path / "validate.yaml"
        path.write_text(yaml.safe_dump(config))
        assert cli.main(["validate", str(path)]) == 2
        assert words in capsys.readouterr().err


def metaspace_tokenizer():
    """A Llama 2 / Mistral v0.1 style tokenizer.json: a normaliser that prepends "▁" to every text it encodes."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.train_from_iterator(["The capital of France is Paris .", "What is two plus two ? Answer: four",
                             "hello world, this is a test."] * 20,
                            trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
                                                initial_alphabet=list("abcdefghijklmnopqrstuvwxyzAFTW?.,:\n▁")))
    tok.pre_tokenizer = None
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>")


def joined_choice_score(model, tokenizer, prompt_text: str, choice: str) -> float:
    """lm-eval's way: the choice's tokens are those the joined text has beyond the prompt's."""
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    whole = tokenizer(prompt_text + f" {choice}", add_special_tokens=False)["input_ids"]
    assert whole[:len(prompt)] == prompt
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0, :-1].float(), dim=-1)
    return float(sum(logprobs[i - 1, whole[i]] for i in range(len(prompt), len(whole))) / (len(whole) - len(prompt)))


def test_choices_are_scored_on_the_tokens_the_joined_text_has(tokenizer):
    """A tokenizer prepending "▁" to each text gave a choice encoded alone an extra space token the real text does
    not have (every score off, an item's answer flipped); an empty prompt with no BOS scored one choice on nothing
    (a wrap-around slice: log-likelihood 0, always the winner)."""
    tok = metaspace_tokenizer()
    model = make_model("llama", vocab_size=len(tok))
    item = {"question": "The capital of France is", "choices": ["Paris", "four", "world"], "answer": 0}
    prompt_text = "The capital of France is\nAnswer:"
    assert choice_scores(model, tok, item) == pytest.approx(
        [joined_choice_score(model, tok, prompt_text, c) for c in item["choices"]], abs=1e-5)
    # no question, no BOS: the choices are read after the end-of-text token, as lm-eval does
    item = {"question": "", "choices": ["hello world", "Paris"], "answer": 0}
    scores = choice_scores(model, tok, item, prompt_format="{question}", choice_format="{choice}")
    with torch.no_grad():
        for score, choice in zip(scores, item["choices"]):
            ids = [tok.eos_token_id] + tok(choice, add_special_tokens=False)["input_ids"]
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
            assert score == pytest.approx(float(sum(logprobs[i - 1, ids[i]] for i in range(1, len(ids)))
                                                / (len(ids) - 1)), abs=1e-5)


@pytest.mark.parametrize("change, named", [
    ({"question": None}, "question=None; give the question as a string"),
    ({"question": [{"role": "user", "content": "2+2?"}]}, "a conversation: multiple-choice items take the question"),
    ({"choices": ["4", None]}, "the choice(s) [None]; every choice must be a non-empty string"),
    ({"choices": ["4", ""]}, "the choice(s) ['']"),
    ({"choices": [{"text": "4"}, {"text": "5"}]}, "every choice must be a non-empty string"),
])
def test_multiple_choice_fields_of_the_wrong_kind_are_named_not_scored_as_their_repr(change, named):
    item = {"question": "2 + 2 =", "choices": ["4", "5"], "answer": 0}
    with pytest.raises(STSInputError, match=re.escape(named)):
        multiple_choice_accuracy([{**item, **change}])


def test_a_multiple_choice_set_from_pandas_is_read_as_its_rows(tokenizer):
    """MMLU-like data through pandas holds each item's choices as a numpy array: refused as 'needs at least two
    choices'; a DataFrame itself as 'a non-empty list'."""
    import pandas as pd

    model = make_model("llama")
    rows = [{"question": "what is the law", "choices": ["court judge appeal", "sugar"], "answer": i % 2}
            for i in range(4)]
    frame = pd.DataFrame(rows)
    frame["choices"] = frame["choices"].map(np.array)
    expected = multiple_choice_accuracy(rows)(model, tokenizer, "x")
    assert multiple_choice_accuracy(frame)(model, tokenizer, "x") == expected
    assert multiple_choice_accuracy(frame.to_dict("records"))(model, tokenizer, "x") == expected


def test_one_step_trains_and_a_metric_of_no_number_is_named(tmp_path, tokenizer):
    """steps=1 ran its only step at learning rate 0 (a warm-up step rounded up from 10%): every change +0.00%; a
    metric returning None failed in float() naming neither the metric nor the domain."""
    result = validate(make_model("llama"), tokenizer, sae(), domain_texts("law", 32, seed=3), targets(), FAST,
                      seeds=0, output_dir=tmp_path / "one", **{**CHEAP, "steps": 1})
    rates = [e["learning_rate"] for e in result.per_seed[0].log_history if "learning_rate" in e]
    assert rates and all(rate > 0 for rate in rates)
    assert any(abs(v) > 1e-4 for v in result.per_seed[0].nll_delta_rel.values())
    with pytest.raises(STSInputError, match=r"metric\(model, tokenizer, 'law'\) returned None; it must return one "
                                            "number"):
        validate(make_model("llama"), tokenizer, sae(), domain_texts("law", 32, seed=3), targets(), FAST,
                 seeds=0, output_dir=tmp_path / "metric", metric=lambda model, tokenizer, domain: None, **CHEAP)


def test_a_diverged_run_is_said_and_its_saved_result_reads_back(tmp_path, tokenizer, monkeypatch):
    """A diverged run "succeeded" with NaN after, unsaid; its validation.json (NaN written null) failed to load
    back for its table, and sts calibrate said the runs lacked a feature they had."""
    import importlib

    from sts_callback.scoring.calibration import Calibration

    module = importlib.import_module("sts_callback.validation.validate")
    real = module._seed_result

    def diverged(seed, run, *args, **kwargs):
        out = real(seed, run, *args, **kwargs)
        out.nll_after["food"], out.nll_delta_rel["food"], out.nll_delta_abs["food"] = math.nan, math.nan, math.nan
        return out

    monkeypatch.setattr(module, "_seed_result", diverged)
    with pytest.warns(STSDataWarning, match=r"seed 0's held-out NLL after training is not finite on \['food'\]: the "
                                            "model diverged"):
        validate(make_model("llama"), tokenizer, sae(), domain_texts("law", 32, seed=3), targets(), FAST, seeds=0,
                 output_dir=tmp_path / "div", **CHEAP)
    loaded = ValidationResult.load(tmp_path / "div" / "sts")
    assert math.isnan(loaded.per_seed[0].nll_after["food"]) and "food" in loaded.table()
    # one domain diverged, the others measured: said in the table beside the verdict of the rest
    assert "diverged: seed 0's held-out NLL after training is not finite on ['food']" in loaded.table()
    Calibration.from_validation(loaded.to_dict())  # in memory (NaN, not null): the diverged domain left out
    for domain in DOMAINS:  # every change null: calibrate names the divergence, not a missing feature
        loaded.per_seed[0].nll_delta_rel[domain] = math.nan
    for saved in (json.loads(json.dumps(json_safe(loaded.to_dict()))), loaded.to_dict()):
        with pytest.raises(STSInputError, match="No domain of these validation runs has a finite measured change"):
            Calibration.from_validation(saved)


def test_a_score_some_domains_lack_is_left_out_and_said(tmp_path, tokenizer):
    """One one-text target domain has no STS_icl: the whole validation dropped STS_icl, saying nothing."""
    thin = {**targets(), "tiny": [" ".join(domain_texts("code", 6))]}
    with pytest.warns(STSDataWarning, match=r"STS_icl is left out: domain\(s\) \['tiny'\] have no score of it"):
        result = validate(make_model("llama"), tokenizer, sae(), domain_texts("law", 32, seed=3), thin, FAST,
                          seeds=0, output_dir=tmp_path / "thin", **CHEAP)
    assert "sts_icl" not in result.variants and result.left_out == {"sts_icl": ["tiny"]}
    assert "note: STS_icl is left out" in ValidationResult.load(tmp_path / "thin" / "sts").table()


def test_a_grpo_batch_its_groups_do_not_fill_is_refused_before_any_model_work(tmp_path, tokenizer, monkeypatch):
    """TRL's own error came after the model loaded, as a traceback naming generation_batch_size, which validate
    sets from batch_size."""
    import importlib

    module = importlib.import_module("sts_callback.validation.validate")
    monkeypatch.setattr(module, "_train_one_seed", lambda *a, **k: pytest.fail("training started"))
    prompts = [{"prompt": text} for text in domain_texts("law", 8)]
    with pytest.raises(STSConfigError, match=r"GRPO samples 2 completions a prompt \(num_generations\) in batches of "
                                             r"3 .*set batch_size to a multiple of 2"):
        validate(make_model("llama"), tokenizer, sae(), prompts, targets(), FAST, output_dir=tmp_path / "g",
                 reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
                 **{**CHEAP, "batch_size": 3}, training_args={"num_generations": 2})
