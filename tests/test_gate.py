"""Mixture gating on tiny models with constructed data whose answer is known."""

import json
import statistics

import pytest
import torch
from tiny import DOMAIN_WORDS, TinySAE, domain_texts, make_model, make_tokenizer

from sts_callback import STSConfig, STSConfigError, STSDataWarning, STSInputError, forecast
from sts_callback.tools.cli import main
from sts_callback.core.data import load_corpus
from sts_callback.pipelines.gate import (GateDecision, GateRules, MixtureRejected, check_budget, filter_examples,
                                         gate_mixture, write_jsonl)

LAYER = 1


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and the machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def structured_model(tokenizer, seed=0, strength=4.0):
    """A tiny Llama whose domains are separable: each domain's words share an embedding direction, and
    attention is uniform over the context (q, k = 0), so demonstrations pull a query toward their domain."""
    model = make_model("llama", seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        scale = emb[5:].norm(dim=1).mean() * strength
        for words in DOMAIN_WORDS.values():
            direction = torch.randn(emb.shape[1], generator=generator)
            for word in words:
                emb[tokenizer.convert_tokens_to_ids(word)] += direction / direction.norm() * scale
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.zero_()
            layer.self_attn.k_proj.weight.zero_()
    return model


@pytest.fixture(scope="module")
def model(tokenizer):
    return structured_model(tokenizer)


def make_sae(seed=0):
    return TinySAE(32, 64, hook_name=f"blocks.{LAYER}.hook_resid_post", seed=seed)


def config(**overrides):
    # candidate and domain demonstrations alike (2), so a copy of a domain reproduces its own shift
    values = dict(n_shifted=8, shift_tokens=200, domain_tokens=200, batch_size=8, n_demonstrations=2,
                  n_domain_demonstrations=2, top_contexts=0)
    values.update(overrides)
    return STSConfig(**values)


def targets():
    return {d: domain_texts(d, 15) for d in ("law", "code", "chem", "food")}


def candidates():
    return {"law_copy": targets()["law"], "code": domain_texts("code", 20, seed=1),
            "chem": domain_texts("chem", 20, seed=1), "sport": domain_texts("sport", 20, seed=1)}


@pytest.fixture(scope="module")
def decision(model, tokenizer):
    return gate_mixture(model, tokenizer, make_sae(), candidates(), targets(), "law", config=config())


def test_copy_of_protected_domain_is_rejected_by_the_default_rule(decision):
    assert decision.rejected == ["law_copy"]
    assert decision.accepted == ["code", "chem", "sport"]
    reason = decision.candidates["law_copy"].reason
    assert reason.startswith("rejected: STS_icl(law) = ") and "1.5 x median of the other candidates" in reason
    assert f"{decision.candidates['law_copy'].protected_scores['law']:.4g}" in reason
    assert all(decision.candidates[n].reason.startswith("accepted") for n in decision.accepted)
    # the copy has the highest score on law and the highest per-example scores on law
    law = {n: d.protected_scores["law"] for n, d in decision.candidates.items()}
    assert max(law, key=law.get) == "law_copy"
    means = {n: s.mean("law") for n, s in decision.example_scores.items()}
    assert max(means, key=means.get) == "law_copy"
    assert decision.example_scores["law_copy"].worst[0]["score"] == max(decision.example_scores["law_copy"].total)
    # weights of the accepted candidates sum to 1; rejected candidates get none
    assert set(decision.weights) == set(decision.accepted)
    assert sum(decision.weights.values()) == pytest.approx(1.0)
    assert all(w > 0 for w in decision.weights.values())


@pytest.mark.parametrize("seed", [1, 2])
def test_copy_is_the_top_offender_on_other_models(tokenizer, seed):
    model = structured_model(tokenizer, seed=seed)
    result = gate_mixture(model, tokenizer, make_sae(seed), candidates(), targets(), ["law"], GateRules(tolerance=1.1),
                          config=config())
    assert result.rejected == ["law_copy"]
    law = {n: d.protected_scores["law"] for n, d in result.candidates.items()}
    assert max(law, key=law.get) == "law_copy"
    means = {n: s.mean("law") for n, s in result.example_scores.items()}
    assert max(means, key=means.get) == "law_copy"


def test_forecasts_equal_single_forecasts_and_domains_are_encoded_once(model, tokenizer):
    sae = make_sae()
    rows = []
    handle = model.model.layers[0].register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        result = gate_mixture(model, tokenizer, sae, candidates(), targets(), "law", config=config(),
                              score_examples=False)
    finally:
        handle.remove()
    # forwards: one pass over the domains (paired: 2 per batch), then per candidate its shift pass only
    n_domain_texts = sum(d.texts for d in result.forecasts["code"].domains.values())
    assert result.forward_calls["domains"] == 2 * sum(
        -(-d.texts // 8) for d in result.forecasts["code"].domains.values())
    assert sum(rows) == 2 * n_domain_texts + 2 * sum(f.shift_queries for f in result.forecasts.values())
    assert len(rows) == sum(result.forward_calls.values())
    # a separate forecast per candidate would encode the domains once per candidate
    for name, data in candidates().items():
        single = forecast(model, tokenizer, sae, data, targets(), config())
        assert result.forecasts[name].shifted_latents == single.shifted_latents
        for domain, d in single.domains.items():
            assert result.forecasts[name].domains[domain].scores == pytest.approx(d.scores, rel=1e-9)


def test_deterministic_and_json_round_trip(model, tokenizer, decision, tmp_path):
    again = gate_mixture(model, tokenizer, make_sae(), candidates(), targets(), "law", config=config())

    def stable(d):
        data = d.to_dict()
        data.pop("timings")
        for f in data["forecasts"].values():
            f.pop("timings")
        return data

    assert stable(again) == stable(decision)
    loaded = GateDecision.load(decision.save(tmp_path / "gate.json"))
    assert stable(loaded) == json.loads(json.dumps(stable(decision)))
    table = loaded.table()
    assert "REJECT" in table and "law_copy: rejected" in table and "STS_icl(law)" in table
    assert [line.split()[0] for line in table.splitlines()[3:7]] == list(candidates())
    assert table.startswith(f"STS mixture gate: {len(candidates())} candidates, ")
    first = dict(list(loaded.to_dict()["candidates"].items())[:1])
    one = GateDecision.from_dict({**loaded.to_dict(), "candidates": first})
    assert one.table().startswith("STS mixture gate: 1 candidate, ")


def test_filter_examples_keeps_the_lowest_scores_and_round_trips(decision, tmp_path):
    scores = decision.example_scores["code"]
    kept = filter_examples(decision, "code", keep_fraction=0.5)
    assert len(kept.examples) == 10 and kept.indices == sorted(kept.indices)
    assert max(kept.scores) <= min(s for i, s in enumerate(scores.total) if i not in kept.indices)
    assert kept.examples == [domain_texts("code", 20, seed=1)[i] for i in kept.indices]
    path = write_jsonl(kept.examples, tmp_path / "filtered" / "code.jsonl")
    reread = load_corpus(str(path))
    assert [reread[i].prompt for i in range(len(reread))] == kept.examples
    # by threshold, by one domain, and from a loaded decision (which needs the data again)
    threshold = statistics.median(scores.total)
    assert all(s <= threshold for s in filter_examples(decision, "code", threshold=threshold).scores)
    with pytest.warns(STSDataWarning, match=r"threshold=.* keeps none of the 20 examples of 'code'"):
        assert filter_examples(decision, "code", threshold=min(scores.total) - 1).examples == []
    # a rejected candidate's examples are filtered as asked, but said to be no part of the mixture
    with pytest.warns(STSDataWarning, match=r"'law_copy' is not in this decision's mixture \(rejected: "):
        filter_examples(decision, "law_copy", keep_fraction=0.5)
    assert filter_examples(decision, "code", keep_fraction=0.5, domain="law").indices == kept.indices
    loaded = GateDecision.load(decision.save(tmp_path / "gate.json"))
    with pytest.raises(STSInputError, match="data="):
        filter_examples(loaded, "code", keep_fraction=0.5)
    assert filter_examples(loaded, "code", keep_fraction=0.5, data=domain_texts("code", 20, seed=1)).indices == kept.indices
    with pytest.raises(STSConfigError, match="exactly one"):
        filter_examples(decision, "code")
    # chat records come back as chat records
    chats = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
    assert load_corpus(str(write_jsonl(chats, tmp_path / "chat.jsonl")))[0].answer == "a"


def test_a_filtered_candidate_with_values_json_has_no_type_for_is_written_and_read_back(tmp_path):
    """A parquet candidate with a date, Decimal or bytes column crashed `sts gate` after every forward pass, with
    its filtered files half written."""
    import datetime
    import decimal

    import numpy as np
    import pandas as pd

    rows = pd.DataFrame({"text": ["a b", "c d"], "when": [pd.Timestamp("2024-01-01"), pd.NaT],
                         "took": [pd.Timedelta("5s"), pd.Timedelta("1min")],
                         "price": [decimal.Decimal("1.10"), decimal.Decimal("2")], "blob": [b"x", b"yz"],
                         "score": np.array([0.5, np.nan], dtype=np.float32), "day": [datetime.date(2024, 5, 1)] * 2})
    rows.to_parquet(tmp_path / "c.parquet")
    records = list(load_corpus(str(tmp_path / "c.parquet"))._items)  # as filter_examples returns them
    path = write_jsonl(records, tmp_path / "out.jsonl")
    back = [json.loads(line) for line in path.read_text().splitlines()]  # strict JSON: no NaN
    assert [r["text"] for r in back] == ["a b", "c d"] and [r["when"] for r in back] == ["2024-01-01T00:00:00", None]
    assert [r["took"] for r in back] == [5.0, 60.0]  # a duration as its seconds
    stamp = write_jsonl([{"text": "a", "at": np.datetime64("2024-01-01T10:00:00.000000000")}], tmp_path / "np.jsonl")
    assert json.loads(stamp.read_text())["at"].startswith("2024-01-01T10:00:00")  # not an integer of nanoseconds
    assert [r["price"] for r in back] == ["1.10", "2.00"] and back[1]["score"] is None and back[0]["score"] == 0.5
    assert back[0]["blob"] == "eA==" and back[0]["day"] == "2024-05-01"
    assert [e.prompt for e in load_corpus(str(path))] == ["a b", "c d"]


@pytest.mark.parametrize("weights", ["sts", "min_impact"])
def test_with_every_target_protected_no_candidate_is_inferred_to_serve_a_protected_domain(model, tokenizer, weights):
    """Each candidate 'served' the protected domain it moves most, and the STS weights gave the most data to the
    one that moved it most: now none is inferred to serve one and the weights say why; wanted may still name one."""
    both = {k: v for k, v in targets().items() if k in ("law", "food")}
    chosen = {k: v for k, v in candidates().items() if k != "law_copy"}
    with pytest.warns(STSDataWarning, match=r"Every target domain is protected \(\['law', 'food'\]\): candidate"
                                            r"\(s\) \['code', 'chem', 'sport'\] serve no domain"):
        result = gate_mixture(model, tokenizer, make_sae(), chosen, both, ["law", "food"], {"weights": weights},
                              config=config(), score_examples=False)
    assert all(d.serves is None for d in result.candidates.values())
    assert any("Every target domain" in note for note in result.notes)
    if weights == "sts":
        assert result.weights == pytest.approx({n: 1 / len(result.accepted) for n in result.accepted})
    else:  # no floor to keep: the least impact takes the mixture
        least = min(result.accepted, key=lambda n: sum(result.candidates[n].protected_scores[p] /
                                                       max(result.candidates[o].protected_scores[p]
                                                           for o in result.accepted) for p in both))
        assert result.weights[least] == pytest.approx(1.0)
    # named in wanted, a protected domain is served (a replay set kept to preserve it): the user's choice
    replay = gate_mixture(model, tokenizer, make_sae(), chosen, both, ["law", "food"],
                          {"weights": weights, "wanted": {n: "law" for n in chosen}}, config=config(),
                          score_examples=False)
    assert all(d.serves == "law" for d in replay.candidates.values())
    assert not any("serve no domain" in note for note in replay.notes)
    if weights == "min_impact":  # the unprotected targets there, but one text each: nothing scored to serve either
        one_text = {"law": targets()["law"], "food": [" ".join(targets()["food"][:6])],
                    "chem": [" ".join(targets()["chem"][:6])]}
        with pytest.warns(STSDataWarning, match=r"Every unprotected target domain \(\['chem', 'food'\]\) has one "
                                                r"text .*serve no domain, so the weights hold no floor"):
            gate_mixture(model, tokenizer, make_sae(), chosen, one_text, "law", {"weights": weights},
                         config=config(), score_examples=False)


def test_copies_of_an_offender_do_not_raise_each_others_bar(model, tokenizer):
    """Three copies of the protected domain's texts were all accepted by the relative rule (each one's median of
    the other candidates held the other two copies), while one or two were rejected."""
    law = targets()["law"]
    pool = {"crawl_a": law, "crawl_b": list(law), "crawl_c": list(reversed(law)),
            **{k: v for k, v in candidates().items() if k != "law_copy"}}
    with pytest.warns(STSDataWarning, match=r"Candidates \['crawl_a', 'crawl_b', 'crawl_c'\] hold the same examples"):
        result = gate_mixture(model, tokenizer, make_sae(), pool, targets(), "law", config=config(),
                              score_examples=False)
    assert {"crawl_a", "crawl_b", "crawl_c"} <= set(result.rejected)
    distinct = statistics.median(result.forecasts[o].score("law", "sts_icl") for o in ("code", "chem", "sport"))
    assert f"median of the other candidates ({distinct:.4g})" in result.candidates["crawl_b"].reason
    # a distinct candidate is judged against each set of copies once
    sport = [result.forecasts[o].score("law", "sts_icl") for o in ("crawl_a", "code", "chem")]
    assert f"{1.5 * statistics.median(sport):.4g} (1.5 x median" in result.candidates["sport"].reason


def test_weight_rules_and_budget(model, tokenizer, tmp_path):
    wanted = {"code": "code", "chem": "chem", "sport": "food"}
    sts = gate_mixture(model, tokenizer, make_sae(), {k: v for k, v in candidates().items() if k != "law_copy"},
                       targets(), "law", {"wanted": wanted}, budget=220, config=config(), score_examples=False)
    assert sum(sts.weights.values()) == pytest.approx(1.0)
    assert sum(sts.allocation.values()) == 220
    # a budget written 2.2e2 (YAML reads it as a float) is the same whole number; it had been refused
    assert check_budget(2.2e2) == 220 and isinstance(check_budget(2.2e2), int)
    # the paper's rule: a served domain's share is proportional to the other candidates' pressure on it
    pressure = {n: statistics.fmean(sts.forecasts[o].score(wanted[n]) for o in wanted if o != n) for n in wanted}
    total = sum(pressure.values())
    assert sts.weights == pytest.approx({n: p / total for n, p in pressure.items()})

    low = gate_mixture(model, tokenizer, make_sae(), {k: v for k, v in candidates().items() if k != "law_copy"},
                       targets(), "law", GateRules(wanted=wanted, weights="min_impact", floor=0.2), config=config(),
                       score_examples=False)
    assert sum(low.weights.values()) == pytest.approx(1.0)
    assert all(w >= 0.2 - 1e-9 for w in low.weights.values())
    least = min(low.accepted, key=lambda n: low.candidates[n].protected_scores["law"])
    assert low.weights[least] == pytest.approx(0.6)
    # gate.json holds what decided the weights (it held the rejection rules only): wanted, floor, budget
    saved = GateDecision.load(low.save(tmp_path / "low.json")).rules
    assert (saved["wanted"], saved["floor"], saved["budget"]) == (wanted, 0.2, None)
    assert GateDecision.load(sts.save(tmp_path / "sts.json")).rules["budget"] == 220
    # a floor the served domains cannot all get is known only once they are: the decision is kept (it was lost
    # after every forward pass), with the most the weights can give and a note saying so
    with pytest.warns(STSDataWarning, match=r"floor=0.5 for 3 served domains.*use floor=0.333.*lower floor"):
        capped = gate_mixture(model, tokenizer, make_sae(), {k: v for k, v in candidates().items() if k != "law_copy"},
                              targets(), "law", GateRules(wanted=wanted, weights="min_impact", floor=0.5),
                              config=config(), score_examples=False)
    assert capped.weights == pytest.approx({n: 1 / 3 for n in wanted}) and "floor=0.5" in capped.notes[-1]


def test_absolute_limits_and_rank_rule(model, tokenizer, decision):
    law = {n: d.protected_scores["law"] for n, d in decision.candidates.items()}
    bar = statistics.fmean(sorted(law.values())[-2:])  # between the copy and the next candidate
    result = gate_mixture(model, tokenizer, make_sae(), candidates(), targets(), "law", GateRules(limits={"law": bar}),
                          config=config(), score_examples=False)
    assert result.rejected == ["law_copy"]
    assert f"> limit {bar:.4g}" in result.candidates["law_copy"].reason
    assert result.rules["tolerance"] is None  # an explicit rule replaces the default relative rule
    assert result.rules["tolerance_by_domain"] == {"law": None}
    # a limit on another scale than the score's (the example config's 0.5 against Gemma's 1e6): said
    tiny = min(law.values()) / 1000
    with pytest.warns(STSDataWarning, match=r"limits\['law'\]=.* is below every candidate's STS_icl\(law\) .* by "
                                            "more than 100x: limits are on the gated score's own scale"):
        with pytest.raises(MixtureRejected):
            gate_mixture(model, tokenizer, make_sae(), candidates(), targets(), "law", GateRules(limits={"law": tiny}),
                         config=config(), score_examples=False)
    ranked = gate_mixture(model, tokenizer, make_sae(), candidates(), targets(), "law", GateRules(max_rank=1),
                          config=config(), score_examples=False)
    for name, d in ranked.candidates.items():
        assert d.accepted == (d.protected_ranks["law"] > 1), name
        assert ("law ranks 1 of 4 target domains (max_rank=1" in d.reason) == (not d.accepted)
    assert not ranked.candidates["law_copy"].accepted


def test_a_protected_domain_that_limits_leave_out_keeps_the_default_rule(model, tokenizer):
    # law and food protected, a limit for food only: law was checked by no rule at all, and its copy got in
    result = gate_mixture(model, tokenizer, make_sae(), candidates(), targets(), ["law", "food"],
                          GateRules(limits={"food": 1.0}), config=config(), score_examples=False)
    assert "law_copy" in result.rejected
    assert "STS_icl(law)" in result.candidates["law_copy"].reason and "1.5 x median" in result.candidates[
        "law_copy"].reason
    assert all("STS_icl(food) = " in d.reason for d in result.candidates.values() if d.accepted)
    assert result.rules["tolerance_by_domain"] == {"law": 1.5, "food": None}  # recorded as judged (was: null)


def test_bad_inputs(model, tokenizer):
    sae = make_sae()
    with pytest.raises(STSInputError, match="'empty' is empty"):
        gate_mixture(model, tokenizer, sae, {**candidates(), "empty": []}, targets(), "law", config=config())
    with pytest.raises(STSInputError, match="not among the target domains"):
        gate_mixture(model, tokenizer, sae, candidates(), targets(), ["law", "sport"], config=config())
    with pytest.raises(STSInputError, match="non-empty dict"):
        gate_mixture(model, tokenizer, sae, {}, targets(), "law", config=config())
    with pytest.raises(STSConfigError, match="weights="):
        gate_mixture(model, tokenizer, sae, candidates(), targets(), "law", {"weights": "equal"}, config=config())
    with pytest.raises(STSConfigError, match="not protected domains"):
        gate_mixture(model, tokenizer, sae, candidates(), targets(), "law", {"limits": {"code": 1}}, config=config())
    with pytest.raises(STSConfigError, match="budget=220"):  # the budget was the 7th positional argument
        gate_mixture(model, tokenizer, sae, candidates(), targets(), "law", 220, config=config())
    with pytest.raises(STSConfigError, match="compute_icl"):
        gate_mixture(model, tokenizer, sae, candidates(), targets(), "law", GateRules(score="sts_icl"),
                     config=config(compute_icl=False, ranking="sts_act"))
    with pytest.raises(STSConfigError, match="residual baseline"):
        gate_mixture(model, tokenizer, sae, candidates(), targets(), "law", config=config(ranking="raw_act"))
    with pytest.raises(STSConfigError, match="budget=0"):
        gate_mixture(model, tokenizer, sae, candidates(), targets(), "law", budget=0, config=config())
    with pytest.raises(MixtureRejected, match="Every candidate was rejected.*Relax the rules") as err:
        gate_mixture(model, tokenizer, sae, candidates(), targets(), "law", GateRules(limits=0.0), config=config(),
                     score_examples=False)
    assert isinstance(err.value, STSConfigError) and err.value.decision.weights == {}
    assert len(err.value.decision.rejected) == 4


def test_a_one_text_domain_the_gate_must_score_is_refused_before_any_forward(model, tokenizer, monkeypatch):
    """A one-text domain has no STS_icl (no other text to demonstrate it): protected, it crashed the example
    scoring (AttributeError) or failed after every pass; served by the STS weights, it failed at the weights."""
    sae, one = make_sae(), [" ".join(domain_texts("food", 6))]
    one_text_law = {**targets(), "law": one}
    with monkeypatch.context() as patched:
        patched.setattr(model, "forward", lambda *a, **k: pytest.fail("a forward pass before the refusal"))
        with pytest.raises(STSInputError, match=r"Protected domain\(s\) \['law'\] have one text.*score='sts_act'"):
            gate_mixture(model, tokenizer, sae, candidates(), one_text_law, "law", config=config())
        with pytest.raises(STSInputError, match=r"wanted names domain\(s\) \['food'\], which have one text"):
            gate_mixture(model, tokenizer, sae, candidates(), {**targets(), "food": one}, "law",
                         {"wanted": {"chem": "food"}}, config=config())
        with pytest.raises(STSInputError, match="Every unprotected target domain"):
            gate_mixture(model, tokenizer, sae, candidates(), {"law": targets()["law"], "food": one}, "law",
                         config=config())
    # gated on STS_act, which needs no demonstration, the same protected domain is scored
    decided = gate_mixture(model, tokenizer, sae, candidates(), one_text_law, "law", GateRules(score="sts_act"),
                           config=config(), score_examples=False)
    assert set(decided.candidates) == set(candidates())
    # a one-text domain among others is never the domain a candidate serves under the STS weights
    decided = gate_mixture(model, tokenizer, sae, candidates(), {**targets(), "food": one}, "law", config=config(),
                           score_examples=False)
    assert "food" not in {d.serves for d in decided.candidates.values()} and sum(decided.weights.values()) > 0.99


@pytest.mark.parametrize("values, words", [
    ({"weights": "equal"}, "GateRules.weights='equal': use one of"),
    ({"floor": 1.0}, "GateRules.floor=1.0 must be in [0, 1)"),
    ({"floor": True}, "GateRules.floor=True"),
    ({"score": "raw_act"}, "residual baseline"),
    ({"score": "sts_x"}, "not a score variant"),
    ({"max_rank": 0}, "GateRules.max_rank=0 must be a positive integer"),
    ({"tolerance": 0}, "GateRules.tolerance=0 must be a positive number"),
    ({"limits": "high"}, "GateRules.limits='high' must be a number or a dict"),
    ({"limits": {"law": "high"}}, "GateRules.limits="),
    ({"wanted": ["code"]}, "GateRules.wanted=['code'] must be a dict"),
    ({"tolerence": 2.0}, "Unknown gate rule(s) ['tolerence']"),
])
def test_gate_rules_are_checked_when_built(values, words):
    with pytest.raises(STSConfigError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        GateRules.from_dict(values)


def test_gate_rules_defaults_and_from_dict():
    assert GateRules() == GateRules.from_dict(None) == GateRules.from_dict({})
    assert GateRules().relative_tolerance == 1.5  # no rule given: the relative rule
    assert GateRules(limits=0.5).relative_tolerance is None  # an explicit rule replaces it
    assert GateRules(max_rank=1, tolerance=2).relative_tolerance == 2.0
    rules = GateRules.from_dict({"limits": {"law": 1}, "weights": "min_impact", "floor": 0, "wanted": {"code": "code"}})
    assert rules.limits == {"law": 1.0} and isinstance(rules.floor, float)
    assert GateRules.from_dict(rules.to_dict()) == rules


def test_cli_gate_rule_keys_are_the_gate_rules_fields():
    import dataclasses

    from sts_callback.tools.cli import CONFIG_KEYS, GATE_RULE_KEYS

    assert set(GATE_RULE_KEYS) == {f.name for f in dataclasses.fields(GateRules)}
    assert set(GATE_RULE_KEYS) <= set(CONFIG_KEYS["gate"])


def test_cli_gate_writes_decision_and_filtered_datasets(model, tokenizer, tmp_path, monkeypatch, capsys):
    import sys

    import sts_callback.tools.cli as cli

    forecast_module = sys.modules["sts_callback.pipelines.forecast"]  # the package exports a function of that name

    real_load_sae = forecast_module.load_sae
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: (model, tokenizer))
    monkeypatch.setattr(forecast_module, "load_sae", lambda spec, **k: real_load_sae(make_sae(), **k))
    for kind, sets in (("candidate", candidates()), ("target", targets())):
        for name, texts in sets.items():
            write_jsonl(texts, tmp_path / f"{kind}_{name}.jsonl")
    spec = {"model": "tiny", "sae": "tiny::sae", "protected": ["law"], "budget": 100,
            "candidates": {n: str(tmp_path / f"candidate_{n}.jsonl") for n in candidates()},
            "targets": {n: str(tmp_path / f"target_{n}.jsonl") for n in targets()},
            "options": config().to_dict(), "output": str(tmp_path / "out" / "gate.json"),
            "filtered_dir": str(tmp_path / "filtered"), "keep_fraction": 0.75}
    (tmp_path / "gate.json").write_text(json.dumps(spec))
    assert main(["gate", str(tmp_path / "gate.json"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "law_copy" in out and "REJECT" in out and "allocation of the budget" in out
    saved = GateDecision.load(tmp_path / "out" / "gate.json")
    assert saved.rejected == ["law_copy"]
    for name in saved.accepted:
        reread = load_corpus(str(tmp_path / "filtered" / f"{name}.jsonl"))
        assert len(reread) == 15  # ceil(0.75 * 20)
    assert not (tmp_path / "filtered" / "law_copy.jsonl").exists()

    # a rerun with another set of candidates: the first run's files of candidates it does not name go too (a
    # later reader of filtered/*.jsonl took them for this mixture's), a file of the user's stays
    dropped = saved.accepted[0]
    (tmp_path / "filtered" / "notes.jsonl").write_text('{"text": "mine"}\n')
    fewer = {**spec, "candidates": {n: p for n, p in spec["candidates"].items() if n != dropped}}
    (tmp_path / "fewer.json").write_text(json.dumps(fewer))
    assert main(["gate", str(tmp_path / "fewer.json"), "--no-progress"]) == 0
    assert f"removed {tmp_path / 'filtered' / dropped}.jsonl (an earlier run's;" in capsys.readouterr().out
    written = GateDecision.load(tmp_path / "out" / "gate.json").accepted
    assert sorted(p.stem for p in (tmp_path / "filtered").glob("*.jsonl")) == sorted([*written, "notes"])
    (tmp_path / "filtered" / "notes.jsonl").unlink()
    saved = GateDecision.load(tmp_path / "out" / "gate.json")

    (tmp_path / "strict.json").write_text(json.dumps({**spec, "limits": {"law": 0.0}}))
    # the flag contradicts filtered_dir (its filtering ranks by those scores): said, not ignored
    assert main(["gate", str(tmp_path / "strict.json"), "--no-progress", "--no-example-scores",
                 "-o", str(tmp_path / "strict_out.json")]) == 2
    assert "drop --no-example-scores, or drop filtered_dir" in capsys.readouterr().err
    assert main(["gate", str(tmp_path / "strict.json"), "--no-progress",
                 "-o", str(tmp_path / "strict_out.json")]) == 3  # a decision: not an input error's 2
    captured = capsys.readouterr()
    assert captured.err.startswith("sts: rejected: Every candidate was rejected") and "REJECT" in captured.out
    assert GateDecision.load(tmp_path / "strict_out.json").weights == {}
    # the first run's filtered sets are gone: a file in filtered_dir is always the latest decision's
    assert not list((tmp_path / "filtered").glob("*.jsonl"))
    assert captured.out.count("an earlier run's;") == len(saved.accepted)
    assert main(["gate", "--example"]) == 0 and "candidates:" in capsys.readouterr().out
    # a threshold that keeps nothing: no empty training files and exit 0 (a pipeline trained on nothing)
    (tmp_path / "none.json").write_text(json.dumps({**{k: v for k, v in spec.items() if k != "keep_fraction"},
                                                   "threshold": -1.0}))
    assert main(["gate", str(tmp_path / "none.json"), "--no-progress", "-o", str(tmp_path / "none_out.json")]) == 3
    captured = capsys.readouterr()
    assert "sts: rejected: the filter (threshold=-1.0) keeps no example" in captured.err
    assert "no file written" in captured.out and not list((tmp_path / "filtered").glob("*.jsonl"))


def test_cli_gate_refuses_to_write_over_its_inputs(tmp_path, monkeypatch, capsys):
    """filtered_dir holding the candidate files (or an output path that is an input) is an error, raised
    before the model is loaded, and no input is touched."""
    import sts_callback.tools.cli as cli

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the overwrite was refused")

    monkeypatch.setattr(cli, "load_model", refuse)
    data = tmp_path / "data"
    for kind, sets in (("candidate", candidates()), ("target", targets())):
        for name, texts in sets.items():
            write_jsonl(texts, data / (f"{name}.jsonl" if kind == "candidate" else f"target_{name}.jsonl"))
    before = {p: p.read_bytes() for p in data.iterdir()}
    spec = {"model": "tiny", "sae": "tiny::sae", "protected": ["law"],
            "candidates": {n: str(data / f"{n}.jsonl") for n in candidates()},
            "targets": {n: str(data / f"target_{n}.jsonl") for n in targets()},
            "options": config().to_dict(), "output": str(tmp_path / "out" / "gate.json")}

    def run(extra, *args):
        path = tmp_path / "gate_config.json"
        path.write_text(json.dumps({**spec, **extra}))
        code = main(["gate", str(path), "--no-progress", *args])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("sts: error: ") and "\n" not in err, err
        return err

    for args in (([], {"filtered_dir": str(data)}), (["--filtered-dir", str(data)], {})):
        err = run(args[1], *args[0])
        assert "filtered_dir" in err and "new folder" in err
        assert any(f"{data / name}.jsonl, which is the input of candidate {name!r}" in err for name in candidates())
    err = run({"output": str(data / "target_law.jsonl")})
    assert str(data / "target_law.jsonl") in err and "input" in err
    err = run({"output": str(tmp_path / "gate_config.json")})
    assert "gate_config.json" in err
    err = run({"filtered_dir": str(tmp_path / "filtered"), "output": str(tmp_path / "filtered" / "chem.jsonl")})
    assert "chem.jsonl" in err
    assert {p: p.read_bytes() for p in data.iterdir()} == before
    assert not (tmp_path / "out").exists()


def test_repeated_or_clashing_names_are_refused(model, tokenizer):
    """A repeated protected domain, or two candidates / rule keys whose names are equal as text, would merge
    or double silently; each is an error naming the name."""
    sae = make_sae()
    with pytest.raises(STSInputError, match=r"\['law'\] are named more than once in `protected`"):
        gate_mixture(model, tokenizer, sae, candidates(), targets(), ["law", "law"], config=config())
    with pytest.raises(STSInputError, match=r"candidates has two entries named '1' \(keys 1 and '1'\)"):
        gate_mixture(model, tokenizer, sae, {1: domain_texts("code", 5), "1": domain_texts("chem", 5)}, targets(),
                     "law", config=config())
    with pytest.raises(STSInputError, match="targets has two entries named '1'"):
        gate_mixture(model, tokenizer, sae, candidates(), {**targets(), 1: ["a b"], "1": ["c d"]}, "law",
                     config=config())
    with pytest.raises(STSConfigError, match="GateRules.limits has two entries named '1'"):
        GateRules(limits={1: 0.5, "1": 0.1})
    with pytest.raises(STSConfigError, match="GateRules.wanted has two entries named '1'"):
        GateRules(wanted={1: "code", "1": "chem"})
    with pytest.raises(STSConfigError, match=r"protected=\{'law': 5\}: name the protected"):
        gate_mixture(model, tokenizer, sae, candidates(), targets(), {"law": 5}, config=config())


def test_a_candidate_that_cannot_be_data_is_named(model, tokenizer):
    with pytest.raises(STSInputError, match="Cannot use int 5 as data for candidate 'code'"):
        gate_mixture(model, tokenizer, make_sae(), {"code": 5}, targets(), "law", config=config())


def test_filter_settings_are_checked_whatever_their_type(decision):
    for settings, words in (({"keep_fraction": 0.5, "threshold": 0.1}, "are both given"),
                            ({}, "Give exactly one of keep_fraction"),
                            ({"keep_fraction": 0}, r"keep_fraction=0 must be a number in \(0, 1\]"),
                            ({"keep_fraction": "0.5"}, "keep_fraction='0.5' must be a number"),
                            ({"keep_fraction": True}, "keep_fraction=True must be a number"),
                            ({"threshold": "high"}, "threshold='high' must be a finite number")):
        with pytest.raises(STSConfigError, match=words):
            filter_examples(decision, "code", **settings)


@pytest.mark.parametrize("extra, words", [
    ({"filtered_dir": "F", "keep_fraction": 0}, r"keep_fraction=0 must be a number in (0, 1]"),
    ({"filtered_dir": "F", "keep_fraction": 0.5, "threshold": 0.1}, "are both given"),
    ({"keep_fraction": 0.5}, "no filtered_dir is given; add `filtered_dir: filtered/`"),
    ({"threshold": 0.1}, "`threshold` says what to keep"),
    ({"candidates": {}}, "`candidates` is empty; name at least one candidate"),
    ({"candidates": ["code.jsonl"]}, "`candidates` must be a mapping name -> JSONL path or registered domain name, "
                                     "not list"),
    ({"protected": ["law", "law"]}, "['law'] are named more than once in `protected`"),
    ({"protected": ["sport"]}, "['sport'] are not among the target domains"),
    ({"budget": 0}, "budget=0 must be a positive whole number"),
    ({"budget": 100.5}, "budget=100.5 must be a positive whole number"),
    ({"max_rank": 4}, "max_rank=4 with 4 target domains rejects every candidate"),
    ({"wanted": {"code": "sport"}}, "wanted['code'] = 'sport' is not a target domain"),
    ({"options": {**config().to_dict(), "compute_icl": False, "ranking": "sts_act"}, "score": "sts_icl"},
     "needs compute_icl=True"),
    ({"candidates": {"code": 5}}, "Cannot use int 5 as data for candidate 'code'"),
    ({"targets": {"law": "nosuch_domain_xyz"}}, "'nosuch_domain_xyz' for target 'law'"),
])
def test_cli_gate_settings_fail_before_the_model_loads(tmp_path, monkeypatch, capsys, extra, words):
    """Every setting of a gate config is checked before the model loads; nothing is written."""
    import yaml

    import sts_callback.tools.cli as cli

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad setting was reported")

    monkeypatch.setattr(cli, "load_model", refuse)
    for kind, sets in (("candidate", candidates()), ("target", targets())):
        for name, texts in sets.items():
            write_jsonl(texts, tmp_path / f"{kind}_{name}.jsonl")
    spec = {"model": "tiny", "sae": "tiny::sae", "protected": ["law"],
            "candidates": {n: str(tmp_path / f"candidate_{n}.jsonl") for n in candidates()},
            "targets": {n: str(tmp_path / f"target_{n}.jsonl") for n in targets()},
            "options": config().to_dict(), "output": str(tmp_path / "out" / "gate.json")}
    spec.update({k: str(tmp_path / v) if k == "filtered_dir" else v for k, v in extra.items()})
    (tmp_path / "gate.yaml").write_text(yaml.safe_dump(spec))
    assert main(["gate", str(tmp_path / "gate.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sts: error: ") and "\n" not in err and words in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "F").exists()


def test_cli_gate_refuses_candidate_names_equal_as_text(tmp_path, monkeypatch, capsys):
    import sts_callback.tools.cli as cli

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    write_jsonl(domain_texts("code", 5), tmp_path / "a.jsonl")
    write_jsonl(domain_texts("chem", 5), tmp_path / "b.jsonl")
    (tmp_path / "gate.yaml").write_text(f"model: tiny\nsae: 'tiny::sae'\nprotected: [x]\ntargets: {{x: {tmp_path}/a.jsonl}}\n"
                                        f"candidates:\n  1: {tmp_path}/a.jsonl\n  '1': {tmp_path}/b.jsonl\n")
    assert main(["gate", str(tmp_path / "gate.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "`candidates` has two entries named '1' (keys 1 and '1')" in err and "rename one" in err


def test_cli_gate_refuses_candidate_names_that_are_no_file_names(tmp_path, monkeypatch, capsys):
    """filtered_dir gets <candidate>.jsonl: '../escaped' was written outside it."""
    import sts_callback.tools.cli as cli

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    write_jsonl(domain_texts("code", 5), tmp_path / "a.jsonl")
    (tmp_path / "gate.yaml").write_text(f"model: tiny\nsae: 'tiny::sae'\nprotected: [x]\ntargets: {{x: {tmp_path}/a.jsonl, "
                                        f"y: {tmp_path}/a.jsonl}}\nfiltered_dir: {tmp_path}/filtered\n"
                                        f"candidates:\n  ../escaped: {tmp_path}/a.jsonl\n")
    assert main(["gate", str(tmp_path / "gate.yaml"), "--no-progress"]) == 2
    assert "['../escaped'] cannot be file names in filtered_dir" in capsys.readouterr().err


@pytest.mark.parametrize("rows, words", [
    ([{"text": "  "}, {"text": ""}], "Candidate 'c' ({path}) has no text: each of its 2 examples is empty or blank"),
    ([{"prompt": "what is law ?"}, {"prompt": "who judges ?"}],
     "Candidate 'c' ({path}) has no examples with answers to use as in-context demonstrations"),
])
def test_cli_gate_refuses_a_candidate_with_nothing_to_forecast_from_before_the_model_loads(tmp_path, monkeypatch,
                                                                                          capsys, rows, words):
    """A blank or prompt-only candidate was refused only after the model loaded (minutes for a large one)."""
    import sts_callback.tools.cli as cli

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    write_jsonl(domain_texts("code", 5), tmp_path / "a.jsonl")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "gate.yaml").write_text(f"model: tiny\nsae: 'tiny::sae'\nprotected: [x]\ntargets: {{x: {tmp_path}/a.jsonl, "
                                        f"y: {tmp_path}/a.jsonl}}\ncandidates:\n  c: {tmp_path}/c.jsonl\n")
    assert main(["gate", str(tmp_path / "gate.yaml"), "--no-progress"]) == 2
    assert words.format(path=tmp_path / "c.jsonl") in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ preference candidates
PROMPTS = ["what is the answer ?", "who is the judge ?", "how do you solve it ?"]


def preference_pairs(chosen_domain, rejected_domain, n=12, seed=1):
    chosen, rejected = domain_texts(chosen_domain, n, seed=seed), domain_texts(rejected_domain, n, seed=seed + 1)
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "chosen": " " + a, "rejected": " " + b}
            for i, (a, b) in enumerate(zip(chosen, rejected))]


def test_preference_candidates_are_gated_on_chosen_minus_rejected(model, tokenizer, monkeypatch, tmp_path):
    """A DPO candidate is forecast as preference_forecast forecasts it (and the DPO callback), not as SFT on its
    chosen answers; each pair's score is its own term of that shift on D_N."""
    import sts_callback.pipelines.gate as gate
    from sts_callback.pipelines.preference import preference_forecast

    sae = make_sae()
    pool = {"prefer_law": preference_pairs("law", "food"), "prefer_chem": preference_pairs("chem", "sport"),
            "code": domain_texts("code", 20, seed=1)}
    pool["prefer_law"][3]["rejected"] = pool["prefer_law"][3]["chosen"]  # a pair that pushes nothing
    # known latent weights (each D_N latent 1/N for every protected domain), to check each pair's score densely
    monkeypatch.setattr(gate, "_latent_weights", lambda stats, protected, score, latents: torch.full(
        (len(latents), len(protected)), 1.0 / len(latents), dtype=torch.float64))
    with pytest.warns(STSDataWarning, match=r"\['prefer_chem', 'prefer_law'\] are preference pairs .* different "
                                            r"scales"):
        result = gate_mixture(model, tokenizer, sae, pool, targets(), "law", config=config(shift_tokens=10_000))
    assert any("different scales" in note for note in result.notes)
    for name in ("prefer_law", "prefer_chem"):
        single = preference_forecast(model, tokenizer, sae, pool[name], targets(), config(shift_tokens=10_000))
        assert result.forecasts[name].settings["shift"] == "chosen_vs_rejected"
        assert result.forecasts[name].shifted_latents == single.shifted_latents
        for domain, d in single.domains.items():
            assert result.forecasts[name].domains[domain].scores == pytest.approx(d.scores, rel=1e-9)
    assert result.forecasts["code"].settings.get("shift", "in_context") == "in_context"
    assert set(result.candidates) == set(pool) and sum(result.weights.values()) == pytest.approx(1.0)
    scores = result.example_scores["prefer_law"]
    assert scores.total[3] == 0.0 and scores.tokens[3] == 0  # identical completions: no term of the shift
    latents = result.forecasts["prefer_law"].shifted_latents

    def mean_latents(prompt, completion):
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = tokenizer(prompt + completion)["input_ids"]
        with torch.no_grad():
            resid = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[LAYER + 1][0]
        return sae.encode(resid[len(prompt_ids):])[:, latents].double().mean(0)

    for i in (0, 1, 5):
        pair = pool["prefer_law"][i]
        expected = (mean_latents(pair["prompt"], pair["chosen"]) - mean_latents(pair["prompt"], pair["rejected"]))
        assert scores.scores["law"][i] == pytest.approx(float(expected.square().mean()), rel=1e-4)
    worst = scores.worst[0]
    chosen = pool["prefer_law"][worst["index"]]
    assert worst["text"].split() == (chosen["prompt"] + chosen["chosen"]).split()  # the pair's text, as trained
    # the worst pairs are dropped, the records kept whole
    with pytest.warns(STSDataWarning, match="1 of the examples of 'prefer_law' have no scored token"):
        kept = filter_examples(result, "prefer_law", keep_fraction=0.5)
    assert len(kept.examples) == 6 and all(set(r) == {"prompt", "chosen", "rejected"} for r in kept.examples)
    assert pool["prefer_law"][3] not in kept.examples  # identical completions train nothing: not the best pair
    # filtered again from gate.json: the pairs given must be the pairs scored (they were never checked)
    loaded = GateDecision.load(result.save(tmp_path / "gate.json"))
    with pytest.warns(STSDataWarning, match="no scored token"):
        assert filter_examples(loaded, "prefer_law", keep_fraction=0.5, data=pool["prefer_law"]).indices == kept.indices
    shuffled = pool["prefer_law"][1:] + pool["prefer_law"][:1]
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in pool["prefer_law"]]
    for other in (shuffled, swapped):
        with pytest.raises(STSInputError, match="Example 0 of the data given for 'prefer_law' is not the one"):
            filter_examples(loaded, "prefer_law", keep_fraction=0.5, data=other)
    # the same pairs in another container digest alike (a datasets.Dataset fills missing keys with None)
    from datasets import Dataset

    chats = [{"prompt": [{"role": "user", "content": p["prompt"]}] if i % 2 else
              [{"role": "user", "content": p["prompt"], "name": "u"}],
              "chosen": [{"role": "assistant", "content": p["chosen"]}],
              "rejected": [{"role": "assistant", "content": p["rejected"]}]} for i, p in enumerate(pool["prefer_law"])]
    assert gate.example_digests(load_corpus(Dataset.from_list(chats))) == gate.example_digests(load_corpus(chats))


def test_a_tokenized_preference_candidate_is_gated_and_previewed(model, tokenizer):
    """TRL's tokenized pairs (prompt_ids / chosen_ids / rejected_ids): the preview of the worst read the records as
    SFT text and failed after every score was computed."""
    tokenized = [{"prompt_ids": tokenizer(p["prompt"])["input_ids"],
                  "chosen_ids": tokenizer(p["chosen"], add_special_tokens=False)["input_ids"],
                  "rejected_ids": tokenizer(p["rejected"], add_special_tokens=False)["input_ids"]}
                 for p in preference_pairs("law", "food")]
    result = gate_mixture(model, tokenizer, make_sae(), {"ids": tokenized, "code": domain_texts("code", 20, seed=1)},
                          targets(), "law", config=config(shift_tokens=10_000))
    assert result.forecasts["ids"].settings["shift"] == "chosen_vs_rejected"
    assert all(w["text"] for w in result.example_scores["ids"].worst)


def test_preference_pairs_are_scored_on_the_tokens_the_forecast_reads(model, tokenizer, monkeypatch):
    """Each pair's score reads the pair as DPOTrainer's cut leaves it, as the candidate's forecast does: a pair
    whose chosen and rejected differ only beyond the cut pushes nothing (it was scored on the dropped tokens)."""
    import sts_callback.pipelines.gate as gate
    from sts_callback.pipelines.preference import Truncation

    pairs = preference_pairs("law", "food")
    shared = " " + " ".join(domain_texts("chem", 4, seed=3))
    pairs[2] = {"prompt": PROMPTS[0], "chosen": shared + " judge court", "rejected": shared + " bread soup"}
    cut = len(tokenizer(PROMPTS[0] + shared)["input_ids"]) - 2  # the cut falls inside the shared start
    monkeypatch.setattr(gate, "preference_truncation", lambda args: Truncation(cut))
    result = gate_mixture(model, tokenizer, make_sae(), {"pairs": pairs}, targets(), "law",
                          config=config(shift_tokens=10_000))
    scores = result.example_scores["pairs"]
    assert scores.total[2] == 0.0 and scores.tokens[2] == 0
    assert sum(t > 0 for t in scores.total) >= len(pairs) // 2  # the others still push


def test_examples_with_no_scored_token_are_not_kept_as_the_least_harmful():
    """An empty example scored 0, so filtering kept it first (and a threshold of 0 kept only the blanks)."""
    from sts_callback.pipelines.gate import ExampleScores

    texts = ["law court judge", "", "cook bake", "   "]
    scores = ExampleScores(candidate="c", tokens=[5, 0, 4, 0], scores={"p": [0.3, 0.0, 0.1, 0.0]},
                           total=[0.3, 0.0, 0.1, 0.0])
    with pytest.warns(STSDataWarning, match="2 of the examples of 'c' have no scored token"):
        assert filter_examples(scores, "c", keep_fraction=0.5, data=texts).examples == ["law court judge", "cook bake"]
    with pytest.warns(STSDataWarning, match="no scored token"):
        assert filter_examples(scores, "c", threshold=0.1, data=texts).examples == ["cook bake"]


def test_accepted_candidates_the_weights_leave_out_are_said_and_no_training_file(model, tokenizer):
    """weights='min_impact' with floor 0 gave accepted candidates a share of 0 with no note, and `sts gate` wrote
    their filtered file as if they were part of the mixture; a budget too small for every candidate, likewise."""
    result = gate_mixture(model, tokenizer, make_sae(), candidates(), targets(), "law",
                          {"weights": "min_impact", "floor": 0.0}, budget=10, config=config(), score_examples=False)
    left_out = [n for n in result.accepted if result.weights.get(n, 0.0) <= 1e-9]
    assert left_out and result.in_mixture == [n for n in result.accepted if n not in left_out]
    assert any(f"{', '.join(left_out)} passed the rules but get(s) no share" in note for note in result.notes)
    small = gate_mixture(model, tokenizer, make_sae(), candidates(), targets(), "law", budget=1, config=config(),
                         score_examples=False)
    assert any("no example of a budget of 1" in note for note in small.notes)


def test_a_prompt_only_candidate_is_refused_with_the_gates_own_fix(model, tokenizer):
    """The forecast's advice, "pass demonstrations=[...]", is no argument of gate_mixture (a TypeError)."""
    prompts = [{"prompt": t} for t in domain_texts("code", 10)]
    with pytest.raises(STSInputError, match="Candidate 'prompts' has no examples with answers") as caught:
        gate_mixture(model, tokenizer, make_sae(), {"prompts": prompts, "chem": domain_texts("chem", 10)}, targets(),
                     "law", config=config())
    assert "demonstrations=" not in str(caught.value)


def test_a_candidate_of_one_text_or_of_copies_is_warned_with_the_gates_own_fix(model, tokenizer):
    """The forecast's warnings advised "pass demonstrations=[...]", which gate_mixture does not take."""
    text = " ".join(domain_texts("law", 4))
    for name, data, words in (("one", [text], "Candidate 'one' has one text"),
                              ("copies", [text] * 30, "Candidate 'copies': .* copies of themselves")):
        with pytest.warns(STSDataWarning, match=words) as caught:
            gate_mixture(model, tokenizer, make_sae(), {name: data, "chem": domain_texts("chem", 10)},
                         targets(), "law", config=config(), score_examples=False)
        advice = [str(w.message) for w in caught if "demonstration" in str(w.message)]
        assert advice and not any("demonstrations=" in message for message in advice), advice
