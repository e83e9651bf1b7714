"""The chosen-vs-rejected forecast of preference data against a direct dense computation, its symmetry, the input
formats TRL uses, and its errors."""

import warnings

import pytest
import torch
from test_forecast import model, tokenizer  # noqa: F401 - the same module-scoped fixtures
from tiny import TinySAE, domain_texts, make_model

from sts_callback import STSConfig, STSConfigError, STSInputError, STSNumericalError
from sts_callback.core.data import load_corpus, load_domains
from sts_callback.core.errors import STSDataWarning
from sts_callback.pipelines.forecast import ForecastSetup, inference_mode, run_forecast
from sts_callback.pipelines.preference import (ContrastUnit, contrast_stats, plan_preference, preference_forecast,
                                               run_preference_forecast, tokenize_preference)

LAYER = 1
PROMPTS = ["what is the answer ?", "how do you solve two and three ?", "who is the judge ?", "why is the ball ?"]


@pytest.fixture(scope="module")
def sae():
    return TinySAE(32, 64, hook_name=f"blocks.{LAYER}.hook_resid_post").double()


def config(**overrides):
    values = dict(n_shifted=10, shift_tokens=10_000, domain_tokens=120, batch_size=3, n_domain_demonstrations=2)
    values.update(overrides)
    return STSConfig(**values)


def targets():
    return {d: domain_texts(d, n=8) for d in ("code", "chem")}


def pairs(n=6, seed=0):
    """Chosen: law text, rejected: food text (leading space: TRL concatenates prompt and completion as they are)."""
    law, food = domain_texts("law", n, seed=seed), domain_texts("food", n, seed=seed)
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "chosen": " " + a, "rejected": " " + b}
            for i, (a, b) in enumerate(zip(law, food))]


def completion_mean(model, sae, tokenizer, prompt, completion):
    """Reference: one unpadded forward of prompt + completion; mean latents and residual over the completion."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + completion)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        resid = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[LAYER + 1][0]
    resid = resid[len(prompt_ids):]
    latents = sae.encode(resid)
    return latents.mean(0), resid.mean(0), latents


def test_shift_equals_dense_computation(model, tokenizer, sae):
    data = pairs()
    setup = ForecastSetup.create(model, tokenizer, sae, config())
    run = run_preference_forecast(setup, data, load_domains(targets()))
    result = run.forecast

    diffs, residual_diffs, rows = [], [], []
    for record in data:
        chosen, chosen_res, chosen_rows = completion_mean(model, sae, tokenizer, record["prompt"], record["chosen"])
        rejected, rejected_res, rejected_rows = completion_mean(model, sae, tokenizer, record["prompt"],
                                                                record["rejected"])
        diffs.append(chosen - rejected)
        residual_diffs.append(chosen_res - rejected_res)
        rows += [chosen_rows, rejected_rows]
    d = torch.stack(diffs)
    shift = (d ** 2).mean(0)
    top = torch.sort(shift, descending=True, stable=True).indices[:10]
    assert result.settings["shift"] == "chosen_vs_rejected"
    assert result.shifted_latents == top.tolist()
    torch.testing.assert_close(torch.tensor(result.shift_values, dtype=torch.float64), shift[top], rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.tensor(result.shift_direction, dtype=torch.float64), d.mean(0)[top],
                               rtol=1e-6, atol=1e-12)
    raw = (torch.stack(residual_diffs) ** 2).mean(0)
    assert result.raw_shifted_dims == torch.sort(raw, descending=True, stable=True).indices[:10].tolist()
    # one row per pair; the training data's own activations are every chosen and rejected completion token
    all_rows = torch.cat(rows)
    assert result.shift_queries == run.shift.units == len(data) == result.settings["preference_pairs"]
    assert result.shift_tokens == all_rows.shape[0] == run.shift.latents.tokens
    torch.testing.assert_close(run.shift.latents.mean(), all_rows.mean(0), rtol=1e-9, atol=1e-12)
    assert set(result.domains) == {"code", "chem"} and result.domains["code"].scores["sts_icl"] > 0
    assert any(c["source"] == "train" for contexts in result.latent_contexts.values() for c in contexts)
    assert "completion tokens, chosen_vs_rejected shift" in result.table()


def test_swapping_chosen_and_rejected_flips_the_direction_only(model, tokenizer, sae):
    data = pairs()
    swapped = [{"prompt": r["prompt"], "chosen": r["rejected"], "rejected": r["chosen"]} for r in data]
    a = preference_forecast(model, tokenizer, sae, data, targets(), config())
    b = preference_forecast(model, tokenizer, sae, swapped, targets(), config())
    assert a.shifted_latents == b.shifted_latents
    assert b.shift_values == pytest.approx(a.shift_values, rel=1e-9)
    assert b.shift_direction == pytest.approx([-v for v in a.shift_direction], rel=1e-9)
    for name in a.domains:
        sa, sb = a.domains[name].scores, b.domains[name].scores
        assert sb["signed_usage"] == pytest.approx(-sa["signed_usage"], rel=1e-9)
        for variant in ("sts_icl", "sts_act", "sts_sq", "forgetting_minus_transfer"):  # magnitudes: unchanged
            assert sb[variant] == pytest.approx(sa[variant], rel=1e-9)


def test_identical_chosen_and_rejected_move_nothing(model, tokenizer, sae):
    setup = ForecastSetup.create(model, tokenizer, sae, config())
    same = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["chosen"]} for r in pairs()]
    sequences = [tokenize_preference(setup.builder, r, i).chosen for i, r in enumerate(same)]
    with inference_mode(model):
        stats = contrast_stats(setup.extractor(), [ContrastUnit([s, s], [1.0, -1.0]) for s in sequences])
    assert stats.units == len(same)
    assert float(stats.latent_shift.mean_shift().max()) < 1e-20
    assert float(stats.latent_shift.mean_diff().abs().max()) < 1e-10
    with pytest.raises(STSInputError, match="identical chosen and rejected"):
        preference_forecast(model, tokenizer, sae, same, targets(), config())
    # some identical pairs: left out (no DPO gradient), with a warning, and counted in the settings
    with pytest.warns(STSDataWarning, match="identical chosen and rejected"):
        mixed = preference_forecast(model, tokenizer, sae, pairs()[:4] + same[:2], targets(), config())
    assert mixed.shift_queries == 4 and mixed.settings["identical_pairs_skipped"] == 2


def test_completions_with_the_same_tokens_in_another_order_raise_nothing_moved(tokenizer):
    """Attention off: a token's residual does not depend on its neighbours, so two completions made of the same
    tokens have the same mean latents and nothing separates chosen from rejected."""
    model = make_model("llama").double()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    sae = TinySAE(32, 64, hook_name=f"blocks.{LAYER}.hook_resid_post").double()
    data = [{"prompt": p, "chosen": " law court", "rejected": " court law"} for p in PROMPTS]
    with pytest.raises(STSNumericalError, match="differ in no SAE latent"):
        preference_forecast(model, tokenizer, sae, data, targets(), config())


def test_trl_formats_give_the_same_forecast(model, tokenizer, sae):
    data = pairs()
    reference = preference_forecast(model, tokenizer, sae, data, targets(), config())
    tokenized = []  # TRL's DPO preprocessing: prompt_ids, then the rest of prompt + completion
    for r in data:
        prompt_ids = tokenizer(r["prompt"])["input_ids"]
        tokenized.append({"prompt_ids": prompt_ids,
                          "chosen_ids": tokenizer(r["prompt"] + r["chosen"])["input_ids"][len(prompt_ids):],
                          "rejected_ids": tokenizer(r["prompt"] + r["rejected"])["input_ids"][len(prompt_ids):]})
    from datasets import Dataset

    for variant in (tokenized, Dataset.from_list(tokenized)):
        other = preference_forecast(model, tokenizer, sae, variant, targets(), config())
        assert other.shifted_latents == reference.shifted_latents
        assert other.shift_values == pytest.approx(reference.shift_values, rel=1e-9)

    def user(text):
        return [{"role": "user", "content": text}]

    def assistant(text):
        return [{"role": "assistant", "content": text.strip()}]

    explicit = [{"prompt": user(r["prompt"]), "chosen": assistant(r["chosen"]), "rejected": assistant(r["rejected"])}
                for r in data]
    implicit = [{"chosen": user(r["prompt"]) + assistant(r["chosen"]), "rejected": user(r["prompt"]) + assistant(
        r["rejected"])} for r in data]
    a = preference_forecast(model, tokenizer, sae, explicit, targets(), config())
    b = preference_forecast(model, tokenizer, sae, implicit, targets(), config())
    assert a.shifted_latents == b.shifted_latents and a.shift_values == pytest.approx(b.shift_values, rel=1e-12)
    # chat: the completion's own tokens, not the template's special ones (excluded) nor the prompt's
    setup = ForecastSetup.create(model, tokenizer, sae, config())
    ids, counted = tokenize_preference(setup.builder, explicit[0], 0).chosen
    completion = ids[len(ids) - len(counted):]
    assert tokenizer.decode([t for t, c in zip(completion, counted) if c]) == data[0]["chosen"].strip()


def test_budget_seed_and_the_in_context_variant(model, tokenizer, sae):
    data = pairs(20)
    setup = ForecastSetup.create(model, tokenizer, sae, config(shift_tokens=40))
    sampled, counts = plan_preference(setup.builder, setup.config, data)
    sizes = [sum(p.chosen[1]) + sum(p.rejected[1]) for p in sampled]
    assert counts["tokens"] == sum(sizes) >= 40 > sum(sizes[:-1]) and len(sampled) < len(data)
    again, _ = plan_preference(setup.builder, setup.config, data)
    other, _ = plan_preference(setup.builder, setup.config.replace(seed=1), data)
    assert [p.index for p in again] == [p.index for p in sampled] != [p.index for p in other]

    sft = preference_forecast(model, tokenizer, sae, data, targets(), config(shift_tokens=200), shift="in_context")
    direct = run_forecast(ForecastSetup.create(model, tokenizer, sae, config(shift_tokens=200)), load_corpus(data, "train"),
                          load_domains(targets())).forecast
    assert sft.settings["shift"] == direct.settings["shift"] == "in_context"
    assert sft.shifted_latents == direct.shifted_latents and sft.shift_values == direct.shift_values


def test_bad_preference_inputs_name_the_problem(model, tokenizer, sae):
    with pytest.raises(STSInputError, match="empty"):
        preference_forecast(model, tokenizer, sae, [], targets(), config())
    with pytest.raises(STSInputError, match=r"lacks \['rejected'\]"):
        preference_forecast(model, tokenizer, sae, [{"prompt": "x", "chosen": " law"}], targets(), config())
    with pytest.raises(STSInputError, match="records with 'prompt', 'chosen' and 'rejected'"):
        preference_forecast(model, tokenizer, sae, ["law court"], targets(), config())
    with pytest.raises(STSInputError, match="no 'prompt'"):
        preference_forecast(model, tokenizer, sae, [{"chosen": " a", "rejected": [{"role": "user", "content": "b"}]}],
                            targets(), config())
    with pytest.raises(STSConfigError, match="chosen_vs_rejected"):
        preference_forecast(model, tokenizer, sae, pairs(), targets(), config(), shift="rejected")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean input warns about nothing
        preference_forecast(model, tokenizer, sae, pairs(), targets(), config())


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_pairs_are_read_as_the_dpo_collator_cuts_them(model, tokenizer, sae, mode):
    """DPOConfig(max_length=..., truncation_mode=...): TRL's collator cuts each prompt + completion sequence; the
    forecast counts only the completion tokens it trains."""
    from sts_callback.pipelines.preference import Truncation

    setup = ForecastSetup.create(model, tokenizer, sae, config())
    prompt = tokenizer("law court judge statute")["input_ids"]
    chosen = tokenizer("cook bake flour sugar oven", add_special_tokens=False)["input_ids"]
    rejected = tokenizer("gene dna", add_special_tokens=False)["input_ids"]
    record = {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
    cut = Truncation(max_length=7, mode=mode)
    pair = tokenize_preference(setup.builder, record, 0, truncation=cut)
    if mode == "keep_start":  # the completion's end is cut
        assert pair.chosen[0] == (prompt + chosen)[:7] and sum(pair.chosen[1]) == 7 - len(prompt) == 2
    else:  # the prompt's start is cut, the completion kept whole
        assert pair.chosen[0] == (prompt + chosen)[-7:] and sum(pair.chosen[1]) == len(chosen)
    assert pair.rejected[0] == prompt + rejected  # within max_length: as it is
    assert tokenize_preference(setup.builder, record, 0).chosen[0] == prompt + chosen  # no truncation given
    from types import SimpleNamespace

    assert Truncation.from_args(SimpleNamespace(max_length=7, truncation_mode=mode)) == cut
    with pytest.raises(STSConfigError, match="truncation_mode='middle'"):
        Truncation.from_args(SimpleNamespace(max_length=7, truncation_mode="middle"))


def test_implicit_prompt_text_pairs_are_read_as_trl_extracts_their_prompt(model, tokenizer, sae):
    """TRL's DPOTrainer takes {"chosen": text, "rejected": text} (the shared start is the prompt); STS refused it."""
    from trl.data_utils import extract_prompt

    from sts_callback.core.data import implicit_prompt

    implicit = [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]} for p in pairs()]
    turn = [{"role": "user", "content": "q"}]
    for record in implicit + [{"chosen": "same", "rejected": "same"}, {"chosen": "a b", "rejected": "a c"},
                              {"chosen": "a b", "rejected": "a b c"},  # one the start of the other
                              {"chosen": turn, "rejected": turn + [{"role": "assistant", "content": "x"}]}]:
        expected = extract_prompt(record)
        assert implicit_prompt(record["chosen"], record["rejected"]) == (
            expected["prompt"], expected["chosen"], expected["rejected"])
    explicit = [extract_prompt(record) for record in implicit]
    got = preference_forecast(model, tokenizer, sae, implicit, targets(), config())
    want = preference_forecast(model, tokenizer, sae, explicit, targets(), config())
    assert got.shifted_latents == want.shifted_latents
    assert dict(got.ranked()) == pytest.approx(dict(want.ranked()), rel=1e-9)


def test_the_offline_forecast_of_pairs_cuts_them_as_dpo_would(model, tokenizer, sae):
    """training_forecast / sts forecast read every token of a pair where DPOTrainer (max_length 1024 by default)
    cuts it; settings name the trainer's own cut."""
    from trl import DPOConfig

    from sts_callback.pipelines.shifts import training_forecast

    default = DPOConfig.__dataclass_fields__["max_length"].default
    for settings, length in ((None, default), ({"max_length": 12}, 12)):
        got = training_forecast(model, tokenizer, sae, pairs(), targets(), config(), settings=settings)
        want = preference_forecast(model, tokenizer, sae, pairs(), targets(), config(), max_length=length)
        assert dict(got.ranked()) == pytest.approx(dict(want.ranked()), rel=1e-9)
    cut = training_forecast(model, tokenizer, sae, pairs(), targets(), config(), settings={"max_length": 12})
    whole = preference_forecast(model, tokenizer, sae, pairs(), targets(), config())
    assert cut.shift_tokens < whole.shift_tokens
