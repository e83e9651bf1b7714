"""STSSession in a plain PyTorch loop (no Trainer): forecast, re-checks, the guard's stop, files, resume."""

import math
import json
import time
import warnings

import pytest
import torch
from tiny import DOMAIN_WORDS, TinySAE, domain_texts, make_model, make_tokenizer

from sts_callback import GuardConfig, RecheckConfig, STSConfig, STSConfigError, STSDataWarning, STSInputError
from sts_callback.core.data import load_corpus, load_domains
from sts_callback.core.run_store import RunStore
from sts_callback.integrations.session import STSNegativeTransferWarning, STSSession
from sts_callback.pipelines.budget import OverheadBudget

FAST = STSConfig(n_shifted=8, shift_tokens=200, domain_tokens=100, n_domain_demonstrations=2)
DOMAINS = ("law", "food", "chem")
LR = 3e-2


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def train_steps(model, tokenizer, texts, steps, lr=5e-2):
    """A hand-written loop: SGD on the texts' LM loss, one text a step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for i in range(steps):
        batch = tokenizer(texts[i % len(texts)], return_tensors="pt")
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def session_for(tmp_path, tolerance=0.05, recheck=None, **guard):
    return STSSession(TinySAE(32, 64, hook_name="blocks.1.hook_resid_post"), FAST,
                      GuardConfig(protected=["food"], tolerance=tolerance, **guard),
                      RecheckConfig(recheck_tokens=150, loss_tokens=120, loss_precision=None, **(recheck or {})),
                      tmp_path / "sts")


def test_session_forecasts_rechecks_and_stops_a_plain_loop(tmp_path, tokenizer):
    model = make_model("llama")
    train = [" ".join([DOMAIN_WORDS["law"][0]] * 12) + " ."] * 40  # one word over and over: food gets worse
    session = session_for(tmp_path, tolerance=0.0, early_stop=True)
    domains = load_domains({d: domain_texts(d, 30) for d in DOMAINS})
    session.prepare(model, tokenizer, load_corpus(train), domains)
    forecast = session.start(model, load_corpus(train), domains)
    assert set(forecast.domains) == set(DOMAINS) and (tmp_path / "sts" / "forecast.json").exists()
    assert set(session.base_losses) == set(DOMAINS)

    stopped_at = None
    for step in (4, 8):
        train_steps(model, tokenizer, train, 4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            record, decision = session.recheck(model, step, max_steps=8)
        assert record["step"] == step and set(record["loss_delta"]) == set(DOMAINS)
        if decision.stop:
            stopped_at = step
            assert any(issubclass(w.category, STSNegativeTransferWarning) for w in caught)
            break
    # tolerance 0: any rise of the protected domain's held-out loss is a violation
    food = session.history[-1]["loss_delta"]["food"]
    assert (stopped_at is not None) == (food > 0)
    assert stopped_at is not None, "this run was built to harm food: the stop path must run"
    assert session.guard.stop_reason.startswith(f"early stop at step {stopped_at}")
    lines = RunStore(tmp_path / "sts").read_history()
    assert [r["step"] for r in lines] == [r["step"] for r in session.history]
    assert session.write_report() is not None and (tmp_path / "sts" / "report.html").exists()
    # a loop that goes on anyway: every later re-check had said "early stop at step N" again
    train_steps(model, tokenizer, train, 2)
    with pytest.warns(RuntimeWarning, match=f"went on after the early stop at step {stopped_at}"):
        record, decision = session.recheck(model, stopped_at + 2, max_steps=20)
    assert not decision.stop and "early_stop" not in record and record["violations"]
    assert session.guard.stop_reason.startswith(f"early stop at step {stopped_at}")


def started_loop(tmp_path, tokenizer):
    """A hand-written loop's session started on a tiny llama: (model, its training texts, domains, session)."""
    model = make_model("llama")
    train = load_corpus(domain_texts("law", 40, seed=3))
    domains = load_domains({d: domain_texts(d, 30) for d in DOMAINS})
    session = session_for(tmp_path)
    session.prepare(model, tokenizer, train, domains)
    session.start(model, train, domains)
    return model, train, domains, session


def test_session_resumes_from_its_checkpoint_folder(tmp_path, tokenizer):
    model, train, domains, first = started_loop(tmp_path, tokenizer)
    train_steps(model, tokenizer, domain_texts("law", 40, seed=3), 2)
    first.recheck(model, 2, max_steps=4)
    checkpoint = RunStore(tmp_path / "checkpoint-2" / "sts")
    first.save_checkpoint(checkpoint, 2)

    again = session_for(tmp_path)  # a new process: nothing in memory
    again.prepare(model, tokenizer, train, domains)
    again.resume(2, checkpoint, domains)
    assert again.base_losses == first.base_losses and [r["step"] for r in again.history] == [2]
    record, _ = again.recheck(model, 3, max_steps=4)  # the weights of step 2, same held-out tokens: same change
    for name in DOMAINS:
        assert record["loss_delta"][name] == pytest.approx(first.history[0]["loss_delta"][name], abs=1e-6)


def test_a_checkpoint_saved_before_its_steps_recheck_resumes_with_that_recheck_counted(tmp_path, tokenizer):
    """A loop that saves (accelerator.save_state, save_checkpoint) before the same step's re-check: resumed there,
    the checkpoint's count missed that re-check's violation, and with patience 2 the stop came a re-check late (or,
    at the run's last step, never)."""
    model = make_model("llama")
    train, domains = load_corpus(domain_texts("law", 40, seed=3)), load_domains({d: domain_texts(d, 30)
                                                                                for d in DOMAINS})
    first = session_for(tmp_path, max_sts=1e-12, early_stop=True, patience=2)  # every re-check breaks a rule
    first.prepare(model, tokenizer, train, domains)
    first.start(model, train, domains)
    checkpoint = RunStore(tmp_path / "checkpoint-2" / "sts")
    train_steps(model, tokenizer, domain_texts("law", 40, seed=3), 2)
    first.save_checkpoint(checkpoint, 2)  # saved first
    assert first.recheck(model, 2, max_steps=8)[0]["violations"]  # then the step's re-check: a violation
    again = session_for(tmp_path, max_sts=1e-12, early_stop=True, patience=2)  # the loop crashed; resumed
    again.prepare(model, tokenizer, train, domains)
    again.resume(2, checkpoint, domains)
    assert again.guard.violations_in_a_row == 1
    train_steps(model, tokenizer, domain_texts("law", 40, seed=3), 2)
    with pytest.warns(STSNegativeTransferWarning, match="early stop at step 4 after 2 consecutive"):
        assert again.recheck(model, 4, max_steps=8)[1].stop


def test_a_loops_tokenized_probe_a_long_schedule_and_a_recheck_at_the_resumed_step(tmp_path, tokenizer):
    """A run_clm_no_trainer-style loop: its tokenized training set was refused as the probe by the very call that
    said to give it with its tokenizer; 40 rates (one a micro-batch) for 10 steps were cut to the first 10 unsaid;
    a loop resumed at step 2 that re-checks step 2 again was killed ("steps must increase")."""
    from datasets import Dataset

    model = make_model("llama")
    texts = domain_texts("law", 40, seed=3)
    tokenized = Dataset.from_dict({"text": texts}).map(lambda b: tokenizer(b["text"]), batched=True,
                                                        remove_columns=["text"])
    domains = load_domains({d: domain_texts(d, 30) for d in DOMAINS})
    session = session_for(tmp_path)
    session.prepare(model, tokenizer, tokenized, domains)
    session.start(model, tokenized, domains)
    session.learning_rates = [1e-3] * 40
    train_steps(model, tokenizer, texts, 2)
    with pytest.warns(RuntimeWarning, match="40 learning rates for max_steps=10: the early forecast reads the first"):
        session.recheck(model, 2, max_steps=10)
    checkpoint = RunStore(tmp_path / "checkpoint-2" / "sts")
    session.save_checkpoint(checkpoint, 2)
    again = session_for(tmp_path)
    again.prepare(model, tokenizer, tokenized, domains)
    again.resume(2, checkpoint, domains)
    with pytest.warns(RuntimeWarning, match="the re-check of step 2, the step resumed at, is already in the history"):
        record, decision = again.recheck(model, 2, max_steps=10)
    assert record["step"] == 2 and decision is None and [r["step"] for r in again.history] == [2]


def test_a_loop_that_raises_inside_the_session_block_gets_a_report_that_says_so(tmp_path, tokenizer):
    """The report of a loop that raised said "the run had not ended when it was made (still training, ...)"."""
    model, train, domains, session = started_loop(tmp_path, tokenizer)
    session.learning_rates = [1e-3] * 8  # a schedule: the report knows the re-check came before its end
    with pytest.raises(RuntimeError, match="CUDA error"), session:
        train_steps(model, tokenizer, domain_texts("law", 40, seed=3), 2)
        session.recheck(model, 2, max_steps=8)
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")
    report = (tmp_path / "sts" / "report.md").read_text()
    assert "the training loop then raised RuntimeError: CUDA error: an illegal memory access" in report
    assert "still training" not in report


def test_a_resume_with_a_cut_forecast_goes_on_without_it_unless_strict(tmp_path, tokenizer):
    model, train, domains, first = started_loop(tmp_path, tokenizer)
    first.recheck(model, 2, max_steps=4)
    checkpoint = RunStore(tmp_path / "checkpoint-2" / "sts")
    first.save_checkpoint(checkpoint, 2)
    forecast = tmp_path / "sts" / "forecast.json"
    forecast.write_text(forecast.read_text()[:100])  # cut
    again = session_for(tmp_path)
    again.prepare(model, tokenizer, train, domains)
    with pytest.warns(RuntimeWarning, match="forecast .* is unreadable"):
        again.resume(2, checkpoint, domains)
    assert again.forecast is None and again.recheck(model, 3, max_steps=4)[0] is not None
    strict = session_for(tmp_path)
    strict.strict = True
    strict.prepare(model, tokenizer, train, domains)
    with pytest.raises(ValueError):
        strict.resume(2, checkpoint, domains)


def test_a_resume_with_another_sae_is_refused_and_checkpoint_folders_may_be_paths(tmp_path, tokenizer):
    """A new user's loop resumed with an SAE of another layer, or other weights: its latents were compared with the
    train-start statistics of the first SAE, silently. Paths given for the checkpoint folder had raised
    AttributeError."""
    from sts_callback.core.errors import STSInputError

    model, train, domains, first = started_loop(tmp_path, tokenizer)
    first.recheck(model, 2, max_steps=4)
    first.save_checkpoint(str(tmp_path / "checkpoint-2" / "sts"), 2)  # a path, as the session's own folder
    for sae, what in ((TinySAE(32, 64, hook_name="blocks.0.hook_resid_post"), "blocks.0.hook_resid_post"),
                      (TinySAE(32, 64, hook_name="blocks.1.hook_resid_post", seed=1), "weights")):
        other = STSSession(sae, FAST, GuardConfig(protected=["food"]),
                           RecheckConfig(recheck_tokens=150, loss_tokens=120, loss_precision=None), tmp_path / "sts")
        other.prepare(model, tokenizer, train, domains)
        with pytest.raises(STSInputError, match=f"measured with another SAE .*{what}.*Resume with the SAE the run "
                                                "started with"):
            other.resume(2, tmp_path / "checkpoint-2" / "sts", domains)
    from sts_callback import STSUsageError

    wrong_step = session_for(tmp_path)
    wrong_step.prepare(model, tokenizer, train, domains)
    with pytest.raises(STSUsageError, match=r"resume\(5, \.\.\.\) from .*checkpoint-2.*saved at step 2"):
        wrong_step.resume(5, tmp_path / "checkpoint-2" / "sts", domains)
    fewer = {name: corpus for name, corpus in domains.items() if name != "chem"}
    again = session_for(tmp_path)
    again.prepare(model, tokenizer, train, fewer)
    with pytest.warns(STSDataWarning, match=r"resuming without target domain\(s\) \['chem'\].*not re-checked"):
        again.resume(2, tmp_path / "checkpoint-2" / "sts", fewer)  # the same SAE: resumes
    assert again.base_losses == first.base_losses
    assert "chem" not in again.recheck(model, 3, max_steps=4)[0]["loss_delta"]


def test_start_with_other_texts_under_the_prepared_names_is_refused(tmp_path, tokenizer):
    """The forecast read start()'s texts and the re-checks prepare()'s: chem's texts under the name food were
    forecast as food, silently."""
    from sts_callback import STSUsageError

    model = make_model("llama")
    probe = load_corpus(domain_texts("law", 30))
    session = session_for(tmp_path)
    session.prepare(model, tokenizer, probe, {d: domain_texts(d, 30) for d in DOMAINS})
    swapped = {d: domain_texts("chem" if d == "food" else d, 30) for d in DOMAINS}
    with pytest.raises(STSUsageError, match=r"other texts for \['food'\] than prepare\(\) sampled"):
        session.start(model, probe, swapped)
    session.start(model, probe, {d: domain_texts(d, 30) for d in DOMAINS})  # the same texts, loaded again: fine


def test_a_resume_from_the_run_folder_counts_the_violations_it_kept(tmp_path, tokenizer):
    """A loop that never saved a checkpoint resumes from its run folder, whose counters were written at train
    start: two violating re-checks in a row read as none, so a patience-3 stop came two re-checks late."""
    model = make_model("llama")
    train = [" ".join([DOMAIN_WORDS["law"][0]] * 12) + " ."] * 40  # food gets worse
    domains = load_domains({d: domain_texts(d, 30) for d in DOMAINS})
    first = session_for(tmp_path, tolerance=0.0, early_stop=True, patience=3)
    first.prepare(model, tokenizer, load_corpus(train), domains)
    first.start(model, load_corpus(train), domains)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in (2, 4):
            train_steps(model, tokenizer, train, 2)
            first.recheck(model, step, max_steps=12)
    assert first.guard.violations_in_a_row == 2, [r.get("violations") for r in first.history]
    again = session_for(tmp_path, tolerance=0.0, early_stop=True, patience=3)
    again.prepare(model, tokenizer, load_corpus(train), domains)
    again.resume(4, RunStore(tmp_path / "sts"), domains)
    assert again.guard.violations_in_a_row == 2
    train_steps(model, tokenizer, train, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, decision = again.recheck(model, 6, max_steps=12)
    assert decision.stop  # the third in a row


def run_with_projection(tmp_path, tokenizer, tolerance, early_stop):
    """A harmful plain loop of 16 constant-lr steps, re-checked every 2 steps; returns the session."""
    model = make_model("llama")
    train = [" ".join([DOMAIN_WORDS["law"][0]] * 12) + " ."] * 40
    session = session_for(tmp_path, tolerance=tolerance, early_stop=early_stop)
    session.learning_rates = [LR] * 16
    domains = load_domains({d: domain_texts(d, 30) for d in DOMAINS})
    session.prepare(model, tokenizer, load_corpus(train), domains)
    session.start(model, load_corpus(train), domains)
    for step in range(2, 17, 2):
        train_steps(model, tokenizer, train, 2, lr=LR)
        _, decision = session.recheck(model, step, max_steps=16)
        if decision.stop:
            break
    return session


def test_projected_early_stop_comes_before_the_measured_violation(tmp_path, tokenizer):
    free = run_with_projection(tmp_path / "free", tokenizer, tolerance=10.0, early_stop=False)
    food = [(r["step"], r["loss_delta"]["food"]) for r in free.history]
    assert food[-1][1] > 0.02, food  # the loop harms food
    tolerance = food[-1][1] / 2
    first_violation = next(step for step, change in food if change > tolerance)
    stopped = run_with_projection(tmp_path / "projected", tokenizer, tolerance=tolerance, early_stop="projected")
    last = stopped.history[-1]
    assert "projected by the early forecast" in last["early_stop"], last
    assert last["step"] < first_violation and last["violations"] == []
    low, _ = last["early_forecast_ci"]["food"]
    assert low > tolerance  # the whole interval of the projection is beyond the tolerance


HARMFUL = [" ".join([DOMAIN_WORDS["law"][0]] * 12) + " ."] * 40  # one word over and over


def started(tmp_path, tokenizer, model, recheck=None):
    """A session (food protected, tolerance 10) started on ``model`` for an 8-step constant-lr run."""
    session = session_for(tmp_path, tolerance=10.0, recheck=recheck)
    session.learning_rates = [LR] * 8
    domains = load_domains({d: domain_texts(d, 30) for d in DOMAINS})
    session.prepare(model, tokenizer, load_corpus(HARMFUL), domains)
    session.start(model, load_corpus(HARMFUL), domains)
    return session


def test_unprotected_domains_take_turns_and_the_protected_one_is_always_measured(tmp_path, tokenizer):
    model = make_model("llama")
    train = HARMFUL
    session = started(tmp_path, tokenizer, model, {"loss_domains": 1})
    full = started(tmp_path / "full", tokenizer, model)  # every domain each time, for the same numbers
    measured = []
    for step in (2, 4, 6, 8):
        train_steps(model, tokenizer, train, 2)
        record, _ = session.recheck(model, step, max_steps=8)
        everyone, _ = full.recheck(model, step, max_steps=8)
        measured.append(sorted(record["loss_delta"]))
        for name, delta in record["loss_delta"].items():  # a domain in its turn: the very same measurement
            assert delta == pytest.approx(everyone["loss_delta"][name], abs=1e-7)
        assert set(record["early_forecast"]) == set(record["loss_delta"])
    assert measured == [["food", "law"], ["chem", "food"], ["food", "law"], ["chem", "food"]]
    assert session.history[-1]["loss_delta_ci"].keys() == {"chem", "food"}


def test_overhead_budget_measures_the_domains_it_affords_in_turns(tmp_path, tokenizer):
    model = make_model("llama")
    train = HARMFUL
    session = started(tmp_path, tokenizer, model, {"overhead_budget": 0.5})
    measured, skipped = [], []
    for step, train_seconds, spent in ((2, 3.0, 0.0), (4, 3.0, 0.0), (6, 3.0, 0.0), (8, 0.0, 10.0)):
        train_steps(model, tokenizer, train, 2)
        # costs set by hand, so the choice is exact: 1 s a domain, a credit of 1.5 s (half of 3 s) or none
        budget = session.budget
        budget.train_seconds, budget.recheck_seconds, budget.fixed_seconds = train_seconds, spent, 0.0
        budget.domain_seconds, budget.bookkeeping_seconds = dict.fromkeys(DOMAINS, 1.0), 0.0
        session._clock = time.perf_counter()  # the training steps' wall time (a loaded machine) must not add credit
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            record, _ = session.recheck(model, step, max_steps=8)
        measured.append(sorted(record["loss_delta"]))
        skipped.append(record["overhead"]["skipped"])
    assert measured == [["food", "law"], ["chem", "food"], ["food", "law"], ["food"]]
    assert skipped == [["chem"], ["law"], ["chem"], ["chem", "law"]]
    # the last re-check was over its budget with the protected domain alone: the user is told what to change
    assert any("above overhead_budget=0.5" in str(w.message) for w in caught)
    assert session.history[-1]["overhead"]["share"] > 0.5


def test_overhead_budget_carries_unspent_seconds_and_keeps_the_turn_order():
    budget = OverheadBudget(share=0.1, domain_seconds={"a": 2.0, "b": 1.0, "c": 1.0}, fixed_seconds=1.0)
    budget.add_training(30.0)  # 3 s of credit, 1 s of it fixed: a (2 s) fits, b does not
    assert budget.affordable(["a", "b", "c"]) == ["a"]
    assert budget.affordable(["b", "a", "c"]) == ["b"]  # a prefix: a costly domain is not passed over
    budget.add_recheck(1.5, 1.0, {"b": 0.5})
    budget.add_training(30.0)  # 6 s minus the 1.5 s spent: 4.5 s, 1 s fixed
    assert budget.affordable(["c", "a", "b"]) == ["c", "a", "b"]
    assert budget.spent_share == pytest.approx(1.5 / 60) and OverheadBudget().credit() == float("inf")


def test_overhead_budget_prices_a_domain_not_yet_measured_by_what_a_recheck_reads_and_pays_per_token():
    whole = {"p": 8.0, "a": 8.0, "b": 4.0}  # train-start passes over whole loss sets
    budget = OverheadBudget(share=0.1, domain_seconds=dict(whole), set_tokens={"p": 1000, "a": 1000, "b": 500})
    budget.add_training(100.0)  # 10 s of credit; the fixed part unknown yet
    assert budget.affordable(["a", "b"]) == ["a"]  # priced whole: 8 s, then b's 4 s does not fit
    budget.add_recheck(3.0, 3.0, {"p": 1.0}, {"p": 250})  # a quarter of the set, 4 ms a token
    assert budget.domain_seconds == {"p": 1.0, "a": 1.0, "b": 0.5}  # not the train-start pass's 8 ms a token
    budget.add_training(100.0)  # 20 - 3 = 17 s, 3 s fixed
    assert budget.affordable(["a", "b"]) == ["a", "b"]
    budget.add_recheck(5.0, 2.0, {"p": 2.0, "a": 3.0}, {"p": 500, "a": 200})  # median share 0.35, 5 s / 700 tokens
    assert budget.domain_seconds["a"] == 3.0  # measured: its own cost
    assert budget.domain_seconds["b"] == pytest.approx(500 * 0.35 * 5.0 / 700)


def test_a_resumed_budget_prices_the_domains_as_the_run_did(tmp_path, tokenizer):
    """A resume restored the seconds only: every domain was priced at 0 s and the fixed part at 0, so the first
    re-check after it measured every domain and overspent, and a domain not measured yet was never priced again."""
    live = OverheadBudget(0.03, fixed_seconds=0.5, domain_seconds={"a": 5.0, "b": 5.0, "c": 5.0},
                          set_tokens={"a": 1000, "b": 1000, "c": 1000}, bookkeeping_seconds=0.1)
    live.train_seconds, live.recheck_seconds = 1000.0, 29.0  # 1 s of credit
    resumed = OverheadBudget(0.03)
    resumed.restore(json.loads(json.dumps(live.to_dict())))  # as the history record holds it
    assert resumed.affordable(["a", "b", "c"]) == live.affordable(["a", "b", "c"]) == []
    # through a real resume: the record's accounting and the sets' tokens come back
    model = make_model("llama")
    session = started(tmp_path, tokenizer, model, {"overhead_budget": 0.5})
    train_steps(model, tokenizer, HARMFUL, 2)
    session.recheck(model, 2, max_steps=8)
    checkpoint = RunStore(tmp_path / "checkpoint-2" / "sts")
    session.save_checkpoint(checkpoint, 2)
    before = session.budget
    again = session_for(tmp_path, tolerance=10.0, recheck={"overhead_budget": 0.5})
    domains = load_domains({d: domain_texts(d, 30) for d in DOMAINS})
    again.prepare(model, tokenizer, load_corpus(HARMFUL), domains)
    again.resume(2, checkpoint, domains)
    assert again.budget.domain_seconds == before.domain_seconds and again.budget.fixed_seconds == before.fixed_seconds
    assert again.budget.set_tokens == before.set_tokens and again.budget.measured == before.measured


def test_a_loop_logs_a_recheck_to_its_tracker_as_the_callback_does(tmp_path, tokenizer):
    """A hand-written loop had no documented way to its tracker: accelerate's log() refuses the nested record, and
    the callback's flattening raised KeyError on a failed re-check's record."""
    model = make_model("llama")
    session = started(tmp_path, tokenizer, model)
    assert session.metrics() == {}  # nothing re-checked yet
    train_steps(model, tokenizer, HARMFUL, 2)
    record, _ = session.recheck(model, 2, max_steps=8)
    metrics = session.metrics(record)
    assert metrics == session.metrics() and all(isinstance(v, (int, float)) for v in metrics.values())
    assert metrics["sts/loss_delta/food"] == record["loss_delta"]["food"]
    layer = model.model.layers[1]
    layer.forward = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.warns(RuntimeWarning):
        session.recheck(model, 4, max_steps=8)
    assert "error" in session.history[-1] and session.metrics() == {}


def test_a_recheck_inside_disable_adapter_says_it_measures_the_base_model(tmp_path, tokenizer):
    """Inside `with model.disable_adapter():` a re-check measured the base model and recorded 0% as a point of the
    run, the warning blaming a learning rate of 0; on a fresh adapter set active, 0% with no word at all."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    session = started(tmp_path, tokenizer, model)
    with model.disable_adapter(), pytest.warns(STSDataWarning, match="adapters disabled"):
        session.recheck(model, 2, max_steps=8)
    # prepared before the PEFT wrap, started after it (a loop that wraps late): the same warning, not "nothing
    # trained ... the learning rate"
    base = make_model("llama")
    late = session_for(tmp_path / "late")
    probe, domains = load_corpus(domain_texts("law", 40, seed=3)), load_domains({d: domain_texts(d, 30)
                                                                                for d in DOMAINS})
    late.prepare(base, tokenizer, probe, domains)
    wrapped = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    late.start(wrapped, probe, domains)
    with wrapped.disable_adapter(), pytest.warns(STSDataWarning, match="adapters disabled"):
        late.recheck(wrapped, 2, max_steps=8)
    model.add_adapter("second", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.set_adapter("second")
    # one sentence with the fix that applies (no "context" to leave after set_adapter)
    with pytest.warns(STSDataWarning, match=r"runs the adapter\(s\) \['second'\], not the run's \['default'\], so "
                                            r"other weights are measured; set_adapter\('default'\) before"):
        session.recheck(model, 4, max_steps=8)
    model.set_adapter("default")
    with warnings.catch_warnings():
        warnings.simplefilter("error", STSDataWarning)
        warnings.filterwarnings("ignore", message=".*exactly as it was at train start")  # LoRA B starts at 0
        session.recheck(model, 6, max_steps=8)


def test_a_tokenized_dataset_is_a_target_domain_as_the_callback_reads_it(tmp_path, tokenizer):
    """A tokenized datasets.Dataset (input_ids, as a Trainer's eval set) was refused as an STSSession target, the
    hint telling the user to rename a 'body' column it did not have."""
    from datasets import Dataset

    texts = domain_texts("food", 30)
    tokenized = Dataset.from_dict({"input_ids": [tokenizer(t)["input_ids"] for t in texts]})
    model = make_model("llama")
    plain, given = session_for(tmp_path / "plain"), session_for(tmp_path / "tokenized")
    for session, food in ((plain, texts), (given, tokenized)):
        domains = {"food": food, "law": domain_texts("law", 30)}
        session.prepare(model, tokenizer, HARMFUL, domains)
        session.start(model, HARMFUL, domains)
    assert given.base_losses["food"] == pytest.approx(plain.base_losses["food"], rel=1e-5)
    with pytest.raises(STSInputError, match="it is tokenized: give it with its tokenizer"):
        load_domains({"food": tokenized})


def test_recheck_config_errors_name_the_setting():
    with pytest.raises(STSConfigError, match="loss_tokens must be an integer >= 1"):
        RecheckConfig(loss_tokens=0)
    for bad in (0, -2, 1.5, 1.0001, True, "10", [], [3, 0], [0.5, 1.5], float("nan")):
        with pytest.raises(STSConfigError, match="recheck_steps must be None"):
            RecheckConfig(recheck_steps=bad)
    with pytest.raises(STSConfigError, match="mixes steps and fractions"):
        RecheckConfig(recheck_steps=[4, 0.5])
    # among fractions, 1.0 is the run's end (was refused as step 1 mixed with fractions)
    assert RecheckConfig(recheck_steps=[0.25, 0.5, 1.0]).recheck_steps == (0.25, 0.5, 1.0)
    assert RecheckConfig(recheck_steps=[1, 4]).recheck_steps == (1, 4)
    with pytest.raises(STSConfigError, match="mixes steps and fractions"):
        RecheckConfig(recheck_steps=[1, 0.5])  # an integer 1 is a step
    with pytest.raises(STSConfigError, match="loss_domains must be None"):
        RecheckConfig(loss_domains=0)
    with pytest.raises(STSConfigError, match="overhead_budget must be a share of training time"):
        RecheckConfig(overhead_budget=3)
    with pytest.raises(STSConfigError, match="early_method must be one of"):
        RecheckConfig(early_method="lr_law")
    with pytest.raises(STSConfigError, match=r"Unknown re-check setting\(s\) \['loss_token'\]"):
        RecheckConfig.from_dict({"loss_token": 5})
    assert json.loads(json.dumps(RecheckConfig().to_dict())) == RecheckConfig().to_dict()


def test_session_run_level_term_in_a_plain_loop(tmp_path, tokenizer):
    """A plain loop's run-level term through ``estimate_run_level``: 2 real steps of the loop's own optimizer,
    each domain's change and the training data's own, then the weights and the optimizer put back exactly; a
    calibration whose level is ``lookahead_own`` then predicts from it (no domain measured)."""
    import numpy as np
    from transformers import DataCollatorForLanguageModeling

    from sts_callback.pipelines.runlevel import RunLevelConfig, estimate_run_level, training_batches
    from sts_callback.scoring.calibration import Calibration

    model = make_model("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    texts = domain_texts("law", 24, seed=3)
    data = [tokenizer(t) for t in texts]
    batches = training_batches(data, DataCollatorForLanguageModeling(tokenizer, mlm=False), 4, 2, seed=0)
    domains = load_domains({d: domain_texts(d, 30) for d in DOMAINS})
    runs = [(np.zeros((3, 0)), [0.01 - 0.5 * own, 0.02 - 0.5 * own, 0.05 - 0.4 * own], [own], list(DOMAINS))
            for own in (-0.3, -0.1, 0.0, -0.2)]
    own_level = Calibration.fit_level_pattern(runs, [], ["lookahead_own"], domain_prior=True)
    levels = {}
    for name, calibration in (("every", None), ("own_only", own_level)):
        session = STSSession(TinySAE(32, 64, hook_name="blocks.1.hook_resid_post"), FAST, GuardConfig(),
                             RecheckConfig(recheck_tokens=150, loss_tokens=120, loss_precision=None),
                             tmp_path / name / "sts", calibration=calibration)
        probe = load_corpus(texts)
        session.prepare(model, tokenizer, probe, domains)
        weights = [p.detach().clone() for p in model.parameters()]
        measured = {} if calibration is not None else session.monitor.loss_sets
        session.start(model, probe, domains, run_level=lambda m, base: estimate_run_level(
            m, optimizer, batches, measured, RunLevelConfig(steps=2), own=session.monitor.probe, before=base))
        assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))  # put back exactly
        assert not optimizer.state  # the loop's optimizer has taken no step of its own
        levels[name] = session.run_level
        if calibration is not None:
            own = session.run_level["own_change"]
            prior_mean = np.mean([own_level.domain_prior[d] for d in DOMAINS])
            expected = (own_level.intercept + own_level.source_coef[0] * own
                        + own_level.coef[0] * (own_level.domain_prior["law"] - prior_mean) / own_level.scale[0])
            assert session.predicted["law"]["mean"] == pytest.approx(expected, rel=1e-9)
    assert set(levels["every"]["change"]) == set(DOMAINS) and levels["own_only"]["change"] == {}
    assert levels["every"]["own_change"] < -1e-3  # two steps on the training data lower its own loss
    assert levels["own_only"]["own_change"] == pytest.approx(levels["every"]["own_change"], abs=1e-6)


def test_session_methods_out_of_order_are_named_errors(tmp_path, tokenizer):
    from sts_callback import STSUsageError

    model = make_model("llama")
    probe = load_corpus(domain_texts("law", 30))
    domains = load_domains({d: domain_texts(d, 30) for d in DOMAINS})
    session = session_for(tmp_path)
    # arguments out of order or left out: named (were a TypeError / AttributeError deep inside)
    with pytest.raises(STSUsageError, match="tokenizer is NoneType; pass the model's tokenizer"):
        session.prepare(model, None, probe, domains)
    with pytest.raises(STSUsageError, match="model is a .*, not a torch model; pass the model first"):
        session.prepare(tokenizer, model, probe, domains)
    with pytest.raises(STSUsageError, match=r"start\(\) before prepare\(\)"):
        session.start(model, probe, domains)
    with pytest.raises(STSUsageError, match="before the run started"):
        session.recheck(model, 1, max_steps=4)
    session.prepare(model, tokenizer, probe, domains)
    with pytest.raises(STSUsageError, match="before the run started"):
        session.recheck(model, 1, max_steps=4)
    session.start(model, probe, domains)
    with pytest.raises(STSUsageError, match="recheck.*model is a .*, not a torch model"):
        session.recheck(tokenizer, 2, max_steps=4)
    session.recheck(model, 2, max_steps=4)
    for step in (2, 1):
        with pytest.raises(STSUsageError, match="steps must increase"):
            session.recheck(model, step, max_steps=4)
    with pytest.warns(STSDataWarning, match="max_steps=4"):
        session.recheck(model, 10, max_steps=4)
    # a loop's re-check at its end, at the step of its last periodic one: that record is the end (was an error)
    record, decision = session.recheck(model, 10, max_steps=12, ended=True)
    assert record is session.history[-1] and record["ended_early"] == {"max_steps": 12} and decision is None
    with pytest.raises(STSUsageError, match="a step is the optimizer steps taken so far"):
        session.recheck(model, -3, max_steps=-10)
    with pytest.raises(STSUsageError, match=r"got the target domains \['chem', 'food'\], prepare\(\)"):
        session.start(model, probe, {n: c for n, c in domains.items() if n in ("chem", "food")})
    session.start(model, probe, domains)  # a second run: its history starts empty, in memory as on disk
    assert session.history == [] and not (tmp_path / "sts" / "history.jsonl").exists()
    session.recheck(model, 1, max_steps=4)
    assert [r["step"] for r in session.history] == [1]
    # prepare() again (e.g. after accelerator.prepare): the base measurements belong to the old monitor
    with pytest.warns(RuntimeWarning, match=r"prepare\(\) after start\(\)"):
        session.prepare(model, tokenizer, probe, domains)
    with pytest.raises(STSUsageError, match="before the run started"):
        session.recheck(model, 2, max_steps=4)

    fresh = session_for(tmp_path / "fresh")
    with pytest.raises(STSUsageError, match=r"resume\(\) before prepare\(\)"):
        fresh.resume(2, RunStore(tmp_path / "checkpoint-2" / "sts"), domains)
    fresh.prepare(model, tokenizer, probe, domains)
    with pytest.raises(STSUsageError, match=r"save_checkpoint\(\) before start\(\)"):
        fresh.save_checkpoint(RunStore(tmp_path / "fresh" / "checkpoint-1" / "sts"), 1)
    assert not (tmp_path / "fresh" / "checkpoint-1").exists()  # no half checkpoint


def test_steps_from_an_accelerate_loop_are_whole_numbers_in_the_history(tmp_path, tokenizer):
    """numpy and tensor step counts, and micro-steps / accumulation as a float, are the int they hold: before,
    an np.int64 step could not be written (no history on disk) and a float one made the report refuse the file."""
    import numpy as np

    from sts_callback import STSUsageError

    model = make_model("llama")
    session = started(tmp_path, tokenizer, model)
    for step in (np.int64(2), torch.tensor(4), 12 / 2):
        record, _ = session.recheck(model, step, max_steps=np.int64(8))
        assert type(record["step"]) is int and "early_forecast" in record
    assert [r["step"] for r in RunStore(tmp_path / "sts").read_history()] == [2, 4, 6]
    assert session.write_report() is not None
    with pytest.raises(STSUsageError, match=r"recheck\(step=6.5\): pass a whole number of optimizer steps"):
        session.recheck(model, 6.5, max_steps=8)


def test_learning_rates_as_arrays_tensors_or_a_scheduler(tmp_path, tokenizer):
    """An array or tensor of rates silently turned the early forecast (and the projected stop) off; a scheduler
    object or a short list is named at once."""
    import numpy as np

    from sts_callback import STSUsageError

    model = make_model("llama")
    session = started(tmp_path, tokenizer, model)
    for rates in (np.full(8, LR), torch.full((8,), LR)):
        session.learning_rates = rates
        assert session.learning_rates == pytest.approx([LR] * 8) and type(session.learning_rates[0]) is float
    record, _ = session.recheck(model, 2, max_steps=8)
    assert "early_forecast" in record and "early_forecast_error" not in record
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    with pytest.raises(STSUsageError, match="got LambdaLR; give each optimizer step's learning rate"):
        session.learning_rates = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    # a NaN made every share of the schedule NaN (in history.jsonl too); all zeros read step 2 as its end
    for rates, said in (([LR, math.nan] * 4, r"learning_rates\[1\] is nan"), ([LR, -LR] * 4, r"\[1\] is -")):
        with pytest.raises(STSUsageError, match=said):
            session.learning_rates = rates
    session.learning_rates = [0.0] * 8
    with pytest.warns(RuntimeWarning, match="every learning rate of the schedule is 0"):
        record, _ = session.recheck(model, 3, max_steps=8)
    assert "early_forecast" not in record and "lr_area_fraction" not in record
    session.learning_rates = [LR] * 7
    with pytest.warns(RuntimeWarning, match="7 learning rates for max_steps=8"):
        record, _ = session.recheck(model, 4, max_steps=8)
    assert "early_forecast" not in record


def test_a_projected_stop_without_a_schedule_says_it_cannot_project(tmp_path, tokenizer):
    model = make_model("llama")
    session = session_for(tmp_path, early_stop="projected")
    domains = load_domains({d: domain_texts(d, 30) for d in DOMAINS})
    session.prepare(model, tokenizer, load_corpus(HARMFUL), domains)
    session.start(model, load_corpus(HARMFUL), domains)
    with pytest.warns(RuntimeWarning, match="early_stop='projected' cannot project \\(no learning-rate schedule"):
        session.recheck(model, 2, max_steps=8)


def test_a_session_refuses_what_would_break_its_run_when_built_or_resumed(tmp_path, tokenizer):
    """resume() after start() archived the run's history and forecast and measured the trained weights as the
    base, silently; a checkpoint path with a typo resumed with reset counters; bad constructor arguments failed
    later with AttributeError, or wrote the run's files into the current folder (out='')."""
    from sts_callback import STSConfigError, STSInputError, STSUsageError
    from sts_callback.core.run_store import RunStore

    model = make_model("llama")
    probe, domains = load_corpus(domain_texts("law", 30)), load_domains({d: domain_texts(d, 30) for d in DOMAINS})
    session = session_for(tmp_path)
    session.prepare(model, tokenizer, probe, domains)
    session.start(model, probe, domains)
    session.recheck(model, 2, max_steps=6)
    session.save_checkpoint(RunStore(tmp_path / "ckpt-2" / "sts"), 2)
    with pytest.raises(STSUsageError, match=r"resume\(\) after start\(\)"):
        session.resume(2, RunStore(tmp_path / "ckpt-2" / "sts"), domains)
    assert [r["step"] for r in session.history] == [2]
    again = session_for(tmp_path)
    again.prepare(model, tokenizer, probe, domains)
    with pytest.raises(STSInputError, match="ckpt-02 nor .* exists"):
        again.resume(2, RunStore(tmp_path / "ckpt-02" / "sts"), domains)
    again.resume(2, RunStore(tmp_path / "ckpt-2" / "sts"), domains)
    assert [r["step"] for r in again.history] == [2]
    sae, guard, recheck = TinySAE(32, 64, hook_name="blocks.1.hook_resid_post"), GuardConfig(), RecheckConfig()
    for args, words in (((sae, FAST, {"protected": ["food"]}, recheck, tmp_path), None),
                        ((sae, FAST, guard, "fast", tmp_path), "recheck= must be a RecheckConfig or a dict"),
                        ((sae, FAST, guard, recheck, ""), "out='' must name the run's STS folder"),
                        ((None, FAST, guard, recheck, tmp_path), "STSSession needs sae="),
                        (("", FAST, guard, recheck, tmp_path), "The SAE path is empty")):
        if words is None:
            assert STSSession(*args).guard.config.protected == ["food"]  # a dict of the fields is taken
            continue
        with pytest.raises(STSConfigError, match=words):
            STSSession(*args)
    with pytest.raises(STSConfigError, match="strict must be True or False"):
        STSSession(sae, FAST, guard, recheck, tmp_path, strict="yes")


def test_learning_rates_without_max_steps_say_why_there_is_no_early_forecast(tmp_path, tokenizer):
    model = make_model("llama")
    probe, domains = load_corpus(domain_texts("law", 30)), load_domains({d: domain_texts(d, 30) for d in DOMAINS})
    session = session_for(tmp_path)
    session.prepare(model, tokenizer, probe, domains)
    session.start(model, probe, domains)
    session.learning_rates = [1e-3] * 8
    with pytest.warns(RuntimeWarning, match="got no max_steps"):
        record, _ = session.recheck(model, 2)
    assert "early_forecast" not in record


def test_a_resume_keeps_the_rotation_and_finds_the_run_folder_of_a_loops_own_layout(tmp_path, tokenizer):
    """The loss_domains rotation restarted at every resume (a domain could go unmeasured for ever), and a
    checkpoint outside the Trainer's <output_dir>/checkpoint-<step>/sts layout lost the forecast and history."""
    model = make_model("llama")
    first = started(tmp_path / "run1", tokenizer, model, {"loss_domains": 1})
    train_steps(model, tokenizer, HARMFUL, 2)
    first.recheck(model, 2, max_steps=8)
    checkpoint = RunStore(tmp_path / "run1" / "ckpt" / "step-2" / "sts")  # the loop's own layout
    first.save_checkpoint(checkpoint, 2)

    again = session_for(tmp_path / "run2", tolerance=10.0, recheck={"loss_domains": 1})  # a new folder, a new process
    again.learning_rates = [LR] * 8
    domains = load_domains({d: domain_texts(d, 30) for d in DOMAINS})
    again.prepare(model, tokenizer, load_corpus(HARMFUL), domains)
    again.resume(2, checkpoint, domains)
    assert again.forecast is not None and [r["step"] for r in again.history] == [2]
    assert (tmp_path / "run2" / "sts" / "forecast.json").exists()
    record, _ = again.recheck(model, 4, max_steps=8)
    assert sorted(first.history[0]["loss_delta"]) == ["food", "law"]
    assert sorted(record["loss_delta"]) == ["chem", "food"]  # the turn goes on, not back to law


def test_a_resume_counts_the_rotation_as_the_run_did_when_a_domain_is_measured_every_time(tmp_path, tokenizer):
    """The domain metric_for_best_model reads is measured at every re-check, outside the rotation; a resume counted
    it in, and the rotation came back to a domain out of turn."""
    model = make_model("llama")
    names = ("law", "food", "chem", "code")  # food protected, chem always measured: law and code take turns
    domains = load_domains({d: domain_texts(d, 30) for d in names})

    def session():
        made = session_for(tmp_path, tolerance=10.0, recheck={"loss_domains": 1})
        made.learning_rates = [LR] * 8
        made.prepare(model, tokenizer, load_corpus(HARMFUL), domains)
        made.monitor.always_measured = {"chem"}  # as the callback sets it, before starting or resuming
        return made

    first = session()
    first.start(model, load_corpus(HARMFUL), domains)
    train_steps(model, tokenizer, HARMFUL, 2)
    first.recheck(model, 2, max_steps=8)
    assert sorted(first.history[-1]["loss_delta"]) == ["chem", "food", "law"]
    checkpoint = RunStore(tmp_path / "checkpoint-2" / "sts")
    first.save_checkpoint(checkpoint, 2)
    again = session()
    again.resume(2, checkpoint, domains)
    record, _ = again.recheck(model, 4, max_steps=8)
    assert sorted(record["loss_delta"]) == ["chem", "code", "food"]  # code's turn, not law's again


def test_records_a_long_full_disk_kept_out_reach_the_file_at_the_next_report(tmp_path, tokenizer):
    """A folder full for longer than three re-checks: its records were given up for good (the file kept a gap
    the report did not show). They stay in memory and reach the file at the next checkpoint save or report."""
    model, train, domains, session = started_loop(tmp_path, tokenizer)
    append = session.store.append_history

    def disk_full(record):
        raise OSError(28, "No space left on device")

    session.store.append_history = disk_full
    with pytest.warns(RuntimeWarning, match=r"could not be written .* in 3 tries; it is kept in memory"):
        for step in (1, 2, 3, 4):
            session.recheck(model, step, max_steps=8)
    session.store.append_history = append
    session.recheck(model, 5, max_steps=8)  # the records with tries left go with it
    session.write_report(5)  # the others with the report
    written = sorted(json.loads(line)["step"] for line in (tmp_path / "sts" / "history.jsonl").read_text().splitlines())
    assert written == [1, 2, 3, 4, 5]


def test_a_restart_drops_the_abandoned_attempts_records_a_failed_write_left_out(tmp_path, tokenizer):
    """restart() (auto_find_batch_size's new attempt) moved the abandoned re-checks out of the history file, but a
    record whose write had failed was written later anyway: the file held step 2 twice, one of them the abandoned
    attempt's."""
    model, train, domains, session = started_loop(tmp_path, tokenizer)
    append = session.store.append_history

    def disk_full(record):
        raise OSError(28, "No space left on device")

    session.store.append_history = disk_full
    train_steps(model, tokenizer, domain_texts("law", 40, seed=3), 2)
    with pytest.warns(RuntimeWarning, match="No space left"):
        session.recheck(model, 2, max_steps=4)
    session.store.append_history = append
    session.restart()
    retried, _ = session.recheck(model, 2, max_steps=4)
    written = [json.loads(line) for line in (tmp_path / "sts" / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in written] == [2] and written[0]["loss_delta"] == retried["loss_delta"]


def test_the_sae_fit_drift_is_recorded_where_it_began(tmp_path, tokenizer):
    model, train, domains, session = started_loop(tmp_path, tokenizer)
    session.guard.fit_warnings = lambda start, now: {"fit:drift": "The SAE fits the trained weights less and less"}
    with pytest.warns(STSDataWarning, match="less and less"):
        first, _ = session.recheck(model, 2, max_steps=4)
    second, _ = session.recheck(model, 4, max_steps=4)  # still drifting: warned once, recorded once
    assert first["sae_fit_warning"].startswith("The SAE fits") and "sae_fit_warning" not in second


def test_a_run_that_trains_nothing_is_said_to(tmp_path, tokenizer):
    """A GRPO run whose reward never varied within a prompt's completions (zero advantage) re-checked exactly zero
    everywhere: zeros that read as results, with nothing saying the weights never moved."""
    model, train, domains, session = started_loop(tmp_path, tokenizer)
    session.learning_rates = [LR] * 4
    with pytest.warns(STSDataWarning, match="exactly as it was at train start .* nothing has trained"):
        still, _ = session.recheck(model, 2, max_steps=4)
    assert still["model_unchanged"].startswith("the model is exactly as it was")
    assert "model_unchanged" not in session.recheck(model, 3, max_steps=4)[0]  # said once
    md = (tmp_path / "sts" / "report.md").read_text()
    assert "step 2: the model is exactly as it was at train start" in md
    moved, _, _, trained = started_loop(tmp_path / "trained", tokenizer)
    trained.learning_rates = [LR] * 4
    train_steps(moved, tokenizer, HARMFUL, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", STSDataWarning)
        assert "model_unchanged" not in trained.recheck(moved, 2, max_steps=4)[0]


def test_a_violation_that_lasts_across_a_resume_from_the_train_start_state_is_not_new(tmp_path, tokenizer):
    """Resumed from a checkpoint whose STS state was cut (the counters read from the train-start state), the run
    of violations was rebuilt from the history but the rules broken at the last re-check were not: a violation
    going on across the resume was warned about again as new."""
    model = make_model("llama")
    first = session_for(tmp_path, tolerance=0.0)
    first.learning_rates = [LR] * 8
    domains = load_domains({d: domain_texts(d, 30) for d in DOMAINS})
    first.prepare(model, tokenizer, load_corpus(HARMFUL), domains)
    first.start(model, load_corpus(HARMFUL), domains)
    train_steps(model, tokenizer, HARMFUL, 2)
    first.recheck(model, 2, max_steps=8)
    assert first.history[-1]["violations"] and first.guard.violating == ["loss:food"]
    checkpoint = RunStore(tmp_path / "checkpoint-2" / "sts")
    first.save_checkpoint(checkpoint, 2)
    (checkpoint.root / "callback_state.json").unlink()  # the STS save was cut after the Trainer's
    again = session_for(tmp_path, tolerance=0.0)
    again.learning_rates = [LR] * 8
    again.prepare(model, tokenizer, load_corpus(HARMFUL), domains)
    with pytest.warns(RuntimeWarning, match="holds no readable STS state"):
        again.resume(2, checkpoint, domains)
    assert again.guard.violating == ["loss:food"] and again.guard.violations_in_a_row == 1


def test_a_session_of_another_rank_writes_no_checkpoint_and_a_failed_recheck_keeps_the_models_mode(tmp_path,
                                                                                               tokenizer):
    import sts_callback.integrations.session as session_module

    model = make_model("llama")
    session = started(tmp_path, tokenizer, model)
    assert session.is_main  # decided when asked: a session built before init_process_group() learns its rank
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(session_module, "is_main_process", lambda: False)
        assert not session.is_main
    session.is_main = False
    session.save_checkpoint(RunStore(tmp_path / "checkpoint-2" / "sts"), 2)
    assert not (tmp_path / "checkpoint-2").exists()

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory in the held-out pass")

    session.monitor.measure_changes = fail
    session.is_main = True  # the failure is warned about on the main process
    model.eval()
    with pytest.warns(RuntimeWarning, match="failed and was skipped"):
        record, _ = session.recheck(model, 2, max_steps=8)
    assert record is None and not model.training


def test_one_recheck_is_no_course_a_projection_warns_from_the_second_on(tmp_path):
    # +4% (below the 5% tolerance) after 1/8 of a constant schedule projects to +32%, its interval far above the
    # tolerance: a transient rise of one re-check stopped runs that never exceeded it
    session = session_for(tmp_path, tolerance=0.05, early_stop="projected")
    session.learning_rates = [1.0] * 16
    first = session._early_forecast(2, 16, {"food": 0.04}, {"food": [0.035, 0.045]})
    assert first["early_forecast_ci"]["food"][0] > 0.05 and "projected_warnings" not in first
    session.history = [{"step": 2, "loss_delta": {"food": 0.04}, "loss_delta_ci": {"food": [0.035, 0.045]}}]
    second = session._early_forecast(4, 16, {"food": 0.045}, {"food": [0.04, 0.05]})  # still rising: a course
    assert second["projected_warnings"][0].startswith("protected domain 'food' is on course to get worse")


def test_the_report_and_files_written_at_a_recheck_count_in_its_overhead(tmp_path, tokenizer, monkeypatch):
    """The report (three figures) rewritten at each re-check took 0.3-0.5 s against tens of milliseconds of
    measurement on a small model, and was counted neither as training nor as re-checking: overhead_budget read
    10% where the re-checks took 84%."""
    import time as clock

    model = make_model("llama")
    session = started(tmp_path, tokenizer, model)
    write_report = session.write_report

    def slow_report(step=None):
        clock.sleep(0.3)
        return write_report(step)

    monkeypatch.setattr(session, "write_report", slow_report)
    record, _ = session.recheck(model, 2, max_steps=8)
    assert session.budget.bookkeeping_seconds >= 0.3
    assert session.budget.recheck_seconds >= record["seconds"] + 0.3
    record, _ = session.recheck(model, 4, max_steps=8)
    assert record["overhead"]["recheck_seconds"] >= 0.3 + session.history[0]["seconds"] + record["seconds"]


def test_the_budget_keeps_room_for_the_bookkeeping_of_the_next_recheck():
    budget = OverheadBudget(share=0.1, train_seconds=30.0, domain_seconds={"a": 1.0, "b": 1.0}, fixed_seconds=0.5)
    assert budget.affordable(["a", "b"]) == ["a", "b"]  # 3 s of credit: 0.5 fixed + 2 x 1
    budget.add_bookkeeping(1.2)  # the last report took 1.2 s: spent, and paid again next time
    assert budget.recheck_seconds == pytest.approx(1.2) and budget.affordable(["a", "b"]) == []


def test_a_warning_is_not_printed_twice_and_reaches_the_logs_where_they_are_kept(monkeypatch, capsys):
    """Every warning also went to the 'sts_callback' logger: with no logging set up, Python's last-resort handler
    printed it a second time under the warning (and an early stop's line twice)."""
    import logging

    import sts_callback.integrations.session as session_module

    bare = logging.Logger("sts_callback_bare")  # no handler, no parent: a script that never set up logging
    monkeypatch.setattr(session_module, "logger", bare)
    bare.warning("seen")  # what the last-resort handler does with it
    assert "seen" in capsys.readouterr().err
    session_module.log_warning("STS: a warning")
    assert capsys.readouterr().err == ""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    bare.addHandler(handler)  # the user keeps logs: they get it
    session_module.log_warning("STS: %s", "kept")
    assert [r.getMessage() for r in records] == ["STS: kept"]


def test_a_model_cast_to_bf16_mid_run_is_still_measured(tmp_path, tokenizer):
    """The held-out loss's bf16 head / body settings were resolved on the float32 model at prepare(): after
    ``model.to(torch.bfloat16)`` every re-check failed (float input to a bf16 head), so the guard never acted."""
    model = make_model("llama")
    session = session_for(tmp_path, recheck={"loss_head_dtype": "bfloat16", "loss_body_dtype": "bfloat16"})
    domains = load_domains({d: domain_texts(d, 30) for d in DOMAINS})
    probe = load_corpus(domain_texts("law", 40, seed=3))
    session.prepare(model, tokenizer, probe, domains)
    session.start(model, probe, domains)
    model.to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed re-check warns
        record, _ = session.recheck(model, 1, max_steps=4)
    assert "error" not in session.history[-1]
    # the weights did not move: the change is the precision's alone, small
    assert set(record["loss_delta"]) == set(DOMAINS) and all(abs(v) < 0.05 for v in record["loss_delta"].values())


def test_a_session_takes_texts_and_domain_names_as_the_other_entry_points_do(tmp_path, tokenizer, monkeypatch):
    """prepare() / start() given a list of texts or a dict of texts raised a bare AttributeError; the session's
    folder given with ``~`` was written under a folder named ``~``."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    model = make_model("llama")
    session = STSSession(TinySAE(32, 64, hook_name="blocks.1.hook_resid_post"), FAST, GuardConfig(protected=["food"]),
                         RecheckConfig(recheck_tokens=150, loss_tokens=120, loss_precision=None), "~/run/sts")
    texts = {d: domain_texts(d, 30) for d in DOMAINS}
    probe = [{"prompt": t, "completion": t} for t in domain_texts("law", 40, seed=3)]
    session.prepare(model, tokenizer, probe, texts)
    forecast = session.start(model, probe, texts)
    assert set(forecast.domains) == set(DOMAINS)
    assert (tmp_path / "home" / "run" / "sts" / "forecast.json").exists()
    record, _ = session.recheck(model, 1, max_steps=4)
    assert set(record["loss_delta"]) == set(DOMAINS)


def test_a_forecast_ranked_by_a_raw_variant_is_rechecked_charted_and_tracked_by_its_sae_counterpart(tmp_path,
                                                                                                     tokenizer):
    """ranking='raw_sq': re-checks score latents only, so the trackers got no sts/recheck key, the guard read
    STS_act unsaid and the report's table had no column for the ranked variant."""
    import dataclasses

    from sts_callback.reporting.trackers import recheck_metrics

    model = make_model("llama")
    session = STSSession(TinySAE(32, 64, hook_name="blocks.1.hook_resid_post"),
                         dataclasses.replace(FAST, ranking="raw_sq"), GuardConfig(protected=["food"], max_sts=0.0),
                         RecheckConfig(recheck_tokens=150, loss_tokens=120, loss_precision=None), tmp_path / "sts")
    domains = load_domains({d: domain_texts(d, 30) for d in DOMAINS})
    probe = load_corpus([{"prompt": t, "completion": t} for t in domain_texts("law", 40, seed=3)])
    session.prepare(model, tokenizer, probe, domains)
    session.start(model, probe, domains)
    train_steps(model, tokenizer, domain_texts("law", 8), 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record, _ = session.recheck(model, 2, max_steps=4)
    assert session.variant() == "sts_sq"
    assert {f"sts/recheck/{d}" for d in DOMAINS} <= set(recheck_metrics(record, session.variant()))
    assert any("max_sts=0.0 (sts_sq)" in str(w.message) for w in caught)
    page = session.write_report().read_text()
    assert "raw_sq ★" in page


def test_a_loop_that_raises_leaves_a_report_of_every_recheck_it_made(tmp_path, tokenizer):
    """The report was written at the first re-check and then at most once a minute, and not at train start: a loop
    that raised after its second re-check left a report of the first (none if it raised before any), which said
    nothing of the run being unfinished."""
    model = make_model("llama")
    domains = load_domains({d: domain_texts(d, 30) for d in DOMAINS})
    probe = load_corpus([{"prompt": t, "completion": t} for t in domain_texts("law", 40, seed=3)])
    session = session_for(tmp_path)
    session.prepare(model, tokenizer, probe, domains)
    session.learning_rates = [LR] * 8
    session.start(model, probe, domains)
    assert (tmp_path / "sts" / "report.md").exists()  # before any re-check
    with pytest.raises(KeyboardInterrupt), session:
        for step in (2, 4, 6):
            train_steps(model, tokenizer, domain_texts("law", 8), 2)
            session.recheck(model, step, max_steps=8)
            if step == 4:
                raise KeyboardInterrupt
    md = (tmp_path / "sts" / "report.md").read_text()
    assert "**Re-checks:** 2, " in md
    assert ("The last re-check is at step 4 (50% of the learning-rate schedule): the training loop then raised "
            "KeyboardInterrupt, so the end of training is not measured here.") in md


def test_a_loop_without_a_schedule_is_told_once_why_there_is_no_early_forecast(tmp_path, tokenizer, capsys):
    """Without session.learning_rates the records carried no projection and nothing said so (unless
    early_stop='projected')."""
    model = make_model("llama")
    session = session_for(tmp_path)
    domains = load_domains({d: domain_texts(d, 30) for d in DOMAINS})
    session.prepare(model, tokenizer, load_corpus(HARMFUL), domains)
    session.start(model, load_corpus(HARMFUL), domains)
    for step in (2, 4):
        record, _ = session.recheck(model, step, max_steps=8)
        assert "early_forecast" not in record
    assert capsys.readouterr().out.count("re-checks make no early forecast (no learning-rate schedule") == 1


def test_a_violation_that_lasts_does_not_rewrite_the_report_at_every_recheck(tmp_path, tokenizer, monkeypatch):
    """A lasting violation was 'news' at each re-check: on a long run the whole report (read from the whole
    history) was rewritten every time, 82% of the re-checks' time."""
    import sts_callback.integrations.session as session_module

    monkeypatch.setattr(session_module, "REPORT_INTERVAL_SECONDS", 1e9)  # only news rewrites it
    model = make_model("llama")
    session = session_for(tmp_path, tolerance=0.0)
    domains = load_domains({d: domain_texts(d, 30) for d in DOMAINS})
    session.prepare(model, tokenizer, load_corpus(HARMFUL), domains)
    session.start(model, load_corpus(HARMFUL), domains)
    written = []
    write_report = session.write_report

    def counted(step=None):
        written.append(step)
        path = write_report(step)
        session._report_seconds = 1e9  # the cost rule never fires here either
        return path

    monkeypatch.setattr(session, "write_report", counted)
    for step in range(1, 7):
        train_steps(model, tokenizer, HARMFUL, 2)
        session.recheck(model, step, max_steps=20)
    lasting = [r["step"] for r in session.history if r.get("violations")]
    assert len(lasting) >= 3, "the run was built to harm food at every re-check"
    # the first re-check, and the one where the violation began: not each re-check it lasted
    assert written[0] == 1 and len(written) <= 2 and len(session.history) == 6
