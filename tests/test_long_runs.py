"""What a long run meets: a history line cut by a crash before a resume, a resume that lengthens the run (another
learning-rate plan), and re-checks so frequent that rewriting the report at each one would grow with the run."""

import json
import math

import pytest
from test_session import DOMAINS, session_for, train_steps
from tiny import domain_texts, make_model, make_tokenizer

from sts_callback.core.data import load_corpus, load_domains
from sts_callback.core.run_store import CUT_FILE, RunStore
from sts_callback.reporting.report import write_report


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_a_history_line_cut_by_a_crash_moves_aside_on_resume_and_loses_no_later_record(tmp_path):
    store = RunStore(tmp_path / "sts")
    for step in (1, 2, 3):
        store.append_history({"step": step, "loss_delta": {"a": 0.1 * step}})
    text = store.path("history.jsonl").read_text()
    store.path("history.jsonl").write_text(text[:-15])  # step 3's line cut mid-write
    with pytest.warns(RuntimeWarning, match="1 unreadable line"):
        assert [r["step"] for r in store.keep_history_until(2)] == [1, 2]
    assert store.path(CUT_FILE).read_text() == text[:-15].splitlines()[-1] + "\n"  # kept aside, not deleted
    store.append_history({"step": 3, "loss_delta": {"a": 0.31}})  # the resumed run redoes step 3
    assert [r["step"] for r in store.read_history()] == [1, 2, 3]

    # a cut line that no resume cleaned: the next record still starts on a line of its own
    store.path("history.jsonl").write_text(store.path("history.jsonl").read_text()[:-10])
    store.append_history({"step": 4, "loss_delta": {"a": 0.4}})
    with pytest.warns(RuntimeWarning, match="1 unreadable line"):
        assert [r["step"] for r in store.read_history()] == [1, 2, 4]


def test_the_report_says_when_it_skipped_lines_cut_by_a_crash(tmp_path):
    sts = tmp_path / "sts"
    sts.mkdir()
    recheck = {"step": 2, "scores": {"a": {"sts_act": 1.0}}, "loss_delta": {"a": 0.01}, "shifted_latents": [1]}
    (sts / "history.jsonl").write_text(json.dumps(recheck) + "\n" + '{"step": 4, "loss_del')
    with pytest.warns(Warning, match="1 unreadable line"):
        html_path, md_path = write_report(sts)
    for text in (md_path.read_text(), html_path.read_text()):
        assert "1 unreadable line(s) of" in text and "cut by a crash" in text


def plain_run(tmp_path, tokenizer, rates, steps):
    """A plain loop re-checked every 2 steps of ``steps`` on the schedule ``rates``; the session and model."""
    model = make_model("llama")
    texts = domain_texts("law", 40, seed=3)
    session = session_for(tmp_path)
    session.learning_rates = rates
    domains = load_domains({d: domain_texts(d, 30) for d in DOMAINS})
    session.prepare(model, tokenizer, load_corpus(texts), domains)
    session.start(model, load_corpus(texts), domains)
    for step in steps:
        train_steps(model, tokenizer, texts, 2)
        session.recheck(model, step, max_steps=len(rates))
    return session, model, texts, domains


def test_a_resume_that_lengthens_the_run_reads_the_earlier_steps_on_the_schedule_they_ran(tmp_path, tokenizer):
    short = [1.0 - i / 8 for i in range(8)]  # 8 steps, linear decay
    first, model, texts, domains = plain_run(tmp_path, tokenizer, short, (2, 4))
    checkpoint = RunStore(tmp_path / "checkpoint-4" / "sts")
    first.save_checkpoint(checkpoint, 4)
    ran = sum(short[:4])  # the area the first four steps ran

    longer = [1.0 - i / 16 for i in range(16)]  # resumed for 16 steps: another plan
    again = session_for(tmp_path)
    again.learning_rates = longer
    again.prepare(model, tokenizer, load_corpus(texts), domains)
    again.resume(4, checkpoint, domains)
    train_steps(model, tokenizer, texts, 2)
    record, _ = again.recheck(model, 6, max_steps=16)
    total = ran + sum(longer[4:])
    fractions = [r["lr_area_fraction"] for r in again.history]
    assert fractions[:2] == pytest.approx([sum(short[:2]) / total, ran / total])
    assert record["lr_area_fraction"] == pytest.approx((ran + sum(longer[4:6])) / total)
    assert fractions == sorted(fractions)  # one course: the share of the run only grows
    assert record["max_steps"] == 16 and record["lr_area"] == pytest.approx(ran + sum(longer[4:6]))


def test_the_same_plan_after_a_resume_keeps_the_fractions(tmp_path, tokenizer):
    rates = [1.0 - i / 8 for i in range(8)]
    first, model, texts, domains = plain_run(tmp_path, tokenizer, rates, (2, 4))
    checkpoint = RunStore(tmp_path / "checkpoint-4" / "sts")
    first.save_checkpoint(checkpoint, 4)
    again = session_for(tmp_path)
    again.learning_rates = rates
    again.prepare(model, tokenizer, load_corpus(texts), domains)
    again.resume(4, checkpoint, domains)
    record, _ = again.recheck(model, 6, max_steps=8)
    assert [r["lr_area_fraction"] for r in again.history] == [r["lr_area_fraction"] for r in first.history] + [
        pytest.approx(sum(rates[:6]) / sum(rates))]


def test_frequent_rechecks_rewrite_the_report_only_with_news_or_after_a_while(tmp_path, tokenizer, monkeypatch):
    import sts_callback.integrations.session as session_module

    written = []
    original = session_module.STSSession.write_report

    def counting(self, step=None):
        written.append(step)
        return original(self, step)

    monkeypatch.setattr(session_module.STSSession, "write_report", counting)
    plain_run(tmp_path, tokenizer, [1.0] * 8, (2, 4, 6, 8))
    assert written == [0, 2, 8]  # train start, the first re-check and the run's last; nothing new between
    monkeypatch.setattr(session_module, "REPORT_INTERVAL_SECONDS", 0.0)
    written.clear()
    plain_run(tmp_path / "again", tokenizer, [1.0] * 8, (2, 4, 6, 8))
    assert written == [0, 2, 4, 6, 8]
    assert math.isfinite(json.loads((tmp_path / "again" / "sts" / "history.jsonl").read_text().splitlines()[-1])[
        "lr_area_fraction"])


def test_a_resume_measures_the_held_out_texts_the_run_started_with(tmp_path, tokenizer, monkeypatch):
    from sts_callback import STSInputError
    from sts_callback.pipelines.monitor import Monitor

    rates = [1.0] * 8
    first, model, texts, domains = plain_run(tmp_path, tokenizer, rates, (2,))
    checkpoint = RunStore(tmp_path / "checkpoint-2" / "sts")
    first.save_checkpoint(checkpoint, 2)
    started_with = {name: list(sequences) for name, sequences in first.monitor.loss_sets.items()}
    sample = Monitor.sample_sequences

    def sampled_otherwise(*args, **kwargs):  # a later version that samples the held-out texts otherwise
        sequences, tokens = sample(*args, **kwargs)
        return sequences[1:], tokens

    monkeypatch.setattr(Monitor, "sample_sequences", staticmethod(sampled_otherwise))
    again = session_for(tmp_path)
    again.learning_rates = rates
    again.prepare(model, tokenizer, load_corpus(texts), domains)
    again.resume(2, checkpoint, domains)
    assert again.monitor.loss_sets == started_with  # read back from the checkpoint, not sampled again
    record, _ = again.recheck(model, 3, max_steps=8)
    assert all(v is not None for v in record["loss_delta"].values())

    # a checkpoint of an older version keeps no held-out texts: a mismatch is named, not failed at every re-check
    from safetensors.torch import load_file, save_file

    tensors = {k: v for k, v in load_file(str(checkpoint.monitor_path)).items() if not k.startswith("heldout_set/")}
    save_file(tensors, str(checkpoint.monitor_path))
    older = session_for(tmp_path)
    older.prepare(model, tokenizer, load_corpus(texts), domains)
    with pytest.raises(STSInputError, match="held-out texts of .* are not the .* measured at train start"):
        older.resume(2, checkpoint, domains)


def test_a_history_line_that_is_not_a_record_does_not_crash_a_resume_cut(tmp_path):
    """keep_history_until compared r.get("step") of every line: a JSON list, or a step written as text, raised a bare
    AttributeError / TypeError at resume instead of reaching the reader that names the line."""
    from sts_callback.core.run_store import RunStore

    store = RunStore(tmp_path / "sts")
    store.root.mkdir(parents=True)
    store.path("history.jsonl").write_text('{"step": 2}\n[1, 2]\n{"step": "3"}\n{"step": 6}\n')
    kept = store.keep_history_until(4)
    assert {"step": 2} in kept and {"step": 6} not in kept
