"""The HTML / Markdown report: built from a tiny Trainer run and checked in headless Chromium."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import tempfile
import types
import warnings
from pathlib import Path

import pytest
from datasets import Dataset
from tiny import TinySAE, domain_texts, make_model, make_tokenizer
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from sts_callback.core.errors import STSDataWarning, STSInputError
from sts_callback.integrations.callback import STSCallback
from sts_callback.tools.cli import main as sts_main
from sts_callback.pipelines.forecast import DomainForecast, Forecast
from sts_callback.reporting.report import write_report

SCRIPT = "<script>alert(1)</script>"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
FAST = dict(n_shifted=8, shift_tokens=200, domain_tokens=100, n_domain_demonstrations=2, top_contexts=3)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


# --------------------------------------------------------------------------- helpers (from test_callback.py)
def tokenized(tokenizer, texts):
    return Dataset.from_dict({"text": texts}).map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])


def web_texts(n: int, seed: int = 0) -> list[str]:
    """A domain whose texts carry a script tag (one token of the tiny tokenizer), to check escaping."""
    return [f"{text[:-1]} {SCRIPT} code ." for text in domain_texts("code", n, seed=seed)]


def md_ranking(md: str) -> list[str]:
    rows = re.findall(r"^\| (\d+) \| (.+?) \| ", md, flags=re.M)
    return [html.unescape(name.replace("\\|", "|")) for _, name in rows]


def html_ranking(page: str) -> list[str]:
    pattern = r'<tr class="ranking[^"]*" data-rank="\d+" data-domain="([^"]*)"'
    return [html.unescape(name) for name in re.findall(pattern, page)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real (tiny) Trainer run with the callback: forecast, two re-checks, a warning and an early stop."""
    tmp = tmp_path_factory.mktemp("report")
    tokenizer = make_tokenizer()
    tokenizer.add_tokens([SCRIPT])
    callback = STSCallback(
        sae=TinySAE(32, 64, hook_name="blocks.1.hook_resid_post"),
        target_domains={"law": domain_texts("law", 30), "food": domain_texts("food", 30),
                        "chem": domain_texts("chem", 30), "web": web_texts(30)},
        protected=["food"], config=FAST, recheck_tokens=150, loss_tokens=120,
        max_sts=0.0, early_stop=True, patience=2,  # every re-check violates: warnings and an early stop to show
    )
    train = domain_texts("law", 48) + web_texts(16, seed=3)
    args = TrainingArguments(output_dir=str(tmp / "run"), max_steps=6, save_steps=2, logging_steps=1, use_cpu=True,
                             report_to=[], per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="steps")
    trainer = Trainer(model=make_model("llama"), args=args, train_dataset=tokenized(tokenizer, train),
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), processing_class=tokenizer,
                      callbacks=[callback])
    trainer.train()
    assert trainer.state.global_step == 4  # early stop at the second violating re-check
    return tmp / "run"


# --------------------------------------------------------------------------- from a Trainer run
def test_callback_writes_report_and_cli_rewrites_it(run_dir, capsys):
    sts = run_dir / "sts"
    assert (sts / "report.html").exists() and (sts / "report.md").exists()
    assert json.loads((sts / "settings.json").read_text())["protected"] == ["food"]
    (sts / "report.html").unlink()
    assert sts_main(["report", str(run_dir)]) == 0  # the trainer output_dir works as well as sts/ itself
    printed = capsys.readouterr().out
    assert str(sts / "report.html") in printed and str(sts / "report.md") in printed
    page = (sts / "report.html").read_text()
    assert page.count('<img class="plot" src="data:image/png;base64,') == 3  # forecast, timeline, scatter
    assert "early stop" in page and "protected" in page and "Pearson r" in page
    assert "<script" not in page and html.escape(SCRIPT) in page
    assert 'src="http' not in page and "<link" not in page  # self-contained
    md = (sts / "report.md").read_text()
    assert SCRIPT not in md and "early stop at step 4" in md
    forecast = Forecast.load(sts / "forecast.json")
    assert md_ranking(md) == [name for name, _ in forecast.ranked()][:5] == html_ranking(page)[:5]


def _driver(profile: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1200,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager go looking for drivers
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="headless Chromium not installed (apt-get install chromium chromium-driver; .ci/run does)")
def test_report_in_headless_chromium(run_dir):
    pytest.importorskip("selenium", reason="selenium not installed (pip install -e '.[dev]')")
    from selenium.common.exceptions import NoAlertPresentException

    page_path = (run_dir / "sts" / "report.html").resolve()
    if not page_path.exists():
        write_report(run_dir / "sts")
    profile = tempfile.mkdtemp(prefix="sts-chromium-")
    driver = _driver(profile)
    try:
        driver.get(page_path.as_uri())
        driver.execute_script("return document.readyState")
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]);")
        assert len(images) == 3
        for alt, complete, width, height in images:
            assert complete and width > 0 and height > 0, f"plot {alt!r} not rendered"
        with pytest.raises(NoAlertPresentException):
            driver.switch_to.alert.text  # the probe's script tag ran nothing
        assert driver.execute_script("return document.scripts.length") == 0
        text = driver.execute_script("return document.body.innerText")
        assert SCRIPT in text  # shown as text
        marks = driver.execute_script(
            "return Array.from(document.querySelectorAll('.ctx mark')).map(m => m.textContent)")
        assert marks and all(m for m in marks)
        ranking = driver.execute_script(
            "return Array.from(document.querySelectorAll('tr.ranking')).map(r => r.dataset.domain)")
        md = (run_dir / "sts" / "report.md").read_text()
        assert md_ranking(md) == ranking[:len(md_ranking(md))] and ranking
        for _ in range(2):  # full page: the second pass after re-layout at the new size
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(1200, min(int(height) + 120, 12000))
        ARTIFACTS.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(ARTIFACTS / "report.png"))
        assert (ARTIFACTS / "report.png").stat().st_size > 10_000
        errors = [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
        assert errors == [], errors
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# --------------------------------------------------------------------------- fast, no browser, no model
def synthetic_forecast(names: list[str], contexts_text: str = "plain") -> Forecast:
    domains = {name: DomainForecast(name=name, texts=10, tokens=100, scores={
        "sts_icl": 1.0 + i * 0.37 % 1.3, "sts_act": 2.0 - i * 0.1, "sts_sq": 0.1, "raw_icl": 0.0, "raw_act": 0.0,
        "raw_sq": 0.0}) for i, name in enumerate(names)}
    context = {"source": "train", "value": 1.5, "before": f"before {contexts_text}", "token": contexts_text,
               "after": "after"}
    return Forecast(domains=domains, shifted_latents=[5, 9, 2], shift_values=[3.0, 2.0, 1.0],
                    shift_direction=[0.5, -0.2, 0.1], raw_shifted_dims=[0], raw_shift_values=[1.0], shift_tokens=200,
                    shift_queries=10, ranking="sts_icl",
                    settings={"model": "tiny", "layer": 1, "config": {"domain_tokens": 100},
                              "sae": {"d_sae": 64, "neuronpedia_id": "gemma-2-2b/12-res-16k"}},
                    latent_contexts={"5": [context, {**context, "source": names[0]}], "9": [context], "2": []})


def test_escaping_forecast_only_and_markdown_matches_html(tmp_path):
    evil = '<img src=x onerror="alert(2)">'
    names = ["law", "food", evil, "chem|pipes", "sport", "code", "math"]
    sts = tmp_path / "sts"
    synthetic_forecast(names, contexts_text=SCRIPT).save(sts / "forecast.json")  # no history: forecast only
    html_path, md_path = write_report(tmp_path, protected=["food"])  # output_dir resolves to its sts/
    page, md = html_path.read_text(), md_path.read_text()
    assert "<script" not in page and "<img src=x" not in page and "onerror=\"alert" not in page
    assert html.escape(SCRIPT) in page and html.escape(evil) in page
    assert page.count("<img ") == 1 and 'id="timeline"' not in page and 'id="scatter"' not in page
    assert "https://www.neuronpedia.org/gemma-2-2b/12-res-16k/5" in page
    assert "<img" not in md and "<script" not in md and "chem\\|pipes" in md
    expected = [name for name, _ in Forecast.load(sts / "forecast.json").ranked()]
    assert html_ranking(page) == expected
    assert md_ranking(md) == expected[:5]


def test_protected_domains_given_from_python_are_checked_before_anything_is_written(tmp_path):
    synthetic_forecast(["law", "food"]).save(tmp_path / "sts" / "forecast.json")
    with pytest.raises(STSInputError, match=r"\['nosuch'\] are not among the target domains"):
        write_report(tmp_path, protected=["food", "nosuch"])
    with pytest.raises(STSInputError, match="named more than once"):
        write_report(tmp_path, protected=["food", "food"])
    assert not (tmp_path / "sts" / "report.html").exists()


def test_history_only_gate_and_validation(tmp_path):
    sts = tmp_path / "sts"
    sts.mkdir()
    records = [{"step": 2, "scores": {"a": {"sts_act": 1.0, "sts_sq": 0.1}, "b": {"sts_act": 2.0, "sts_sq": 0.2}},
                "loss": {}, "loss_delta": {"a": 0.01, "b": 0.2}, "overlap_with_forecast": None,
                "shifted_latents": [1, 2], "violations": ["held-out loss of protected domain 'b' rose by 20.0%"]},
               {"step": 4, "error": "OutOfMemoryError: <boom>", "traceback": "..."}]
    (sts / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"cut')
    (sts / "settings.json").write_text(json.dumps({"protected": ["b"], "tolerance": 0.05}))
    (sts / "gate.json").write_text(json.dumps({
        "decision": "reject <b>",
        "candidates": [{"name": "set<1>", "accepted": False, "reason": "harms b", "weight": 0.0},
                       {"name": "set2", "accepted": True, "reason": "ok", "weight": 1.0}],
        "weights": {"set2": 1.0}, "worst_examples": [{"text": SCRIPT, "score": 9.5}]}))
    html_path, md_path = write_report(sts)
    page, md = html_path.read_text(), md_path.read_text()
    assert page.count("<img ") == 1  # the timeline; no forecast, no scatter without a forecast
    assert "Gate decision" in page and "set&lt;1&gt;" in page and "Worst-scoring examples" in page
    assert html.escape(SCRIPT) in page and "<script" not in page and "&lt;boom&gt;" in page
    assert "rose by 20.0%" in md and "reject &lt;b&gt;" in md
    # validation measurements + forecast: the scatter with the correlation
    synthetic_forecast(["a", "b", "c"]).save(sts / "forecast.json")
    (sts / "validation.json").write_text(json.dumps({"measured": {"a": 0.1, "b": 0.3, "c": 0.2}}))
    page = write_report(sts)[0].read_text()
    assert 'id="scatter"' in page and "Pearson r = <b>" in page and page.count("<img ") == 3
    # the gate's own format (sts-gate/1): per-candidate forecasts and example scores with their worst examples
    forecast = synthetic_forecast(["a", "b", "c"]).to_dict()
    (sts / "gate.json").write_text(json.dumps({
        "format": "sts-gate/1", "score": "sts_icl", "protected": ["b"], "targets": ["a", "b", "c"],
        "candidates": {"math": {"accepted": True, "reason": "ok", "protected_scores": {"b": 0.1}},
                       "web<x>": {"accepted": False, "reason": "b ranks 1", "protected_scores": {"b": 0.9}}},
        "forecasts": {"math": forecast, "web<x>": forecast}, "weights": {"math": 1.0}, "allocation": None,
        "example_scores": {"web<x>": {"candidate": "web<x>", "tokens": [3], "scores": {"b": [0.9]}, "total": [0.9],
                                      "worst": [{"index": 0, "score": 0.9, "text": SCRIPT}]}},
        "rules": {"top_k": 1}, "notes": []}))
    page = write_report(sts)[0].read_text()
    gate = page[page.index('id="gate"'):]
    assert "Forecast per candidate" in gate and "web&lt;x&gt;" in gate and html.escape(SCRIPT) in gate
    assert "Worst-scoring examples" in gate and "<script" not in page and len(gate) < 20_000


def test_without_matplotlib_the_report_is_written_without_figures_and_says_so_once(tmp_path, monkeypatch):
    """matplotlib is the optional extra `report`: missing, the pages are still written, with no figure, one line
    in the page and one warning per process naming the install command (the callback writes after every re-check)."""
    import sys
    import warnings

    from sts_callback.reporting import report
    from sts_callback.validation.validate import plot_validation

    sts = tmp_path / "sts"
    synthetic_forecast(["a", "b", "c"]).save(sts / "forecast.json")
    record = {"step": 2, "scores": {d: {"sts_act": 1.0} for d in "abc"}, "loss_delta": {"a": 0.01, "b": 0.2, "c": 0.0},
              "shifted_latents": [1]}
    (sts / "history.jsonl").write_text(json.dumps(record) + "\n")
    (sts / "validation.json").write_text(json.dumps({"measured": {"a": 0.1, "b": 0.3, "c": 0.2}}))
    assert write_report(sts)[0].read_text().count('<img class="plot"') == 3  # with matplotlib: every figure

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails as if not installed
    monkeypatch.setattr(report, "_matplotlib_missing", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        html_path, md_path = write_report(sts)
        write_report(sts)  # a second re-check's report: no second warning
    said = [w for w in caught if 'pip install "sts-callback[report]"' in str(w.message)]
    assert len(said) == 1 and issubclass(said[0].category, UserWarning), [str(w.message) for w in caught]
    page = html_path.read_text()
    assert '<img class="plot"' not in page and page.count('id="no-figures"') == 1
    assert 'pip install "sts-callback[report]"' in html.unescape(page)
    assert 'id="forecast"' in page and 'id="timeline"' in page and "Pearson r = <b>" in page  # the rest is there
    assert "| 1 | " in md_path.read_text()
    with pytest.raises(ImportError, match=r'validation\.png needs matplotlib; pip install "sts-callback\[report\]"'):
        plot_validation(None, tmp_path / "validation.png")


def test_report_failure_in_callback_only_warns(tmp_path, monkeypatch):
    import sts_callback.reporting.report as report

    def broken(*args, **kwargs):
        raise ValueError("injected report failure")

    monkeypatch.setattr(report, "write_report", broken)
    (tmp_path / "sts").mkdir()
    (tmp_path / "sts" / "history.jsonl").write_text("")
    callback = STSCallback(sae=TinySAE(32, 64, hook_name="blocks.1.hook_resid_post"), target_domains={"law": ["x"]})
    args, state = types.SimpleNamespace(output_dir=str(tmp_path)), types.SimpleNamespace(
        is_world_process_zero=True, global_step=3)
    with pytest.warns(RuntimeWarning, match="STS report at step 3 was not written.*injected"):
        callback.write_report(args, state)
    assert callback.write_errors[-1]["step"] == 3 and "injected" in callback.write_errors[-1]["error"]
    state.global_step = 4  # the report is rewritten at each re-check and at the end: one warning is enough
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback.write_report(args, state)
    assert not [w for w in caught if "was not written" in str(w.message)]
    assert [e["step"] for e in callback.write_errors] == [3, 4]
    callback.strict = True
    with pytest.raises(ValueError, match="injected"):
        callback.write_report(args, state)


def test_nothing_to_report(tmp_path):
    assert sts_main(["report", str(tmp_path)]) == 2


def test_recheck_changes_carry_their_intervals_and_a_noisy_measurement_is_called_noisy(tmp_path):
    """A re-check's held-out changes are shown with their 95% intervals; when the standard errors are as large as
    the spread across domains, both pages say the order of the domains is mostly noise and how to fix it."""
    sts = tmp_path / "sts"
    sts.mkdir()
    (sts / "settings.json").write_text(json.dumps({"protected": ["b"], "tolerance": 0.05}))

    def history(se: float) -> None:
        record = {"step": 8, "scores": {"a": {"sts_act": 1.0}, "b": {"sts_act": 2.0}, "c": {"sts_act": 0.5}},
                  "loss": {}, "overlap_with_forecast": None, "shifted_latents": [1],
                  "loss_delta": {"a": 0.012, "b": -0.004, "c": 0.02},
                  "loss_delta_ci": {n: [v - 1.96 * se, v + 1.96 * se] for n, v in
                                    {"a": 0.012, "b": -0.004, "c": 0.02}.items()},
                  "loss_delta_se": {"a": se, "b": se, "c": se}}
        (sts / "history.jsonl").write_text(json.dumps(record) + "\n")

    history(se=0.009)  # about the spread of the three changes (sd 0.012): a ceiling near 0.66
    html_path, md_path = write_report(sts)
    page, md = html_path.read_text(), md_path.read_text()
    assert "a +1.2% [-0.6, +3.0]" in page and "b -0.4% [-2.2, +1.4] (protected)" in md
    for text in (page, md):
        assert "noise ceiling" in text and "Raise loss_tokens" in text
    note = re.search(r"order the domains as these measurements do at only about r (\d\.\d\d)", md)
    assert note and 0.5 < float(note.group(1)) < 0.8
    history(se=0.001)  # precise: the order is real, nothing to say
    html_path, md_path = write_report(sts)
    assert "noise ceiling" not in html_path.read_text() and "noise ceiling" not in md_path.read_text()
    assert "a +1.2% [+1.0, +1.4]" in md_path.read_text()


def test_a_gate_only_folder_says_what_it_holds_and_lists_only_its_files(tmp_path):
    """A folder holding only gate.json: no claim of re-checks or of a missing forecast, the gate's outcome said,
    and the footer names the files that are there (not forecast.json / history.jsonl)."""
    sts = tmp_path / "sts"
    sts.mkdir()
    forecast = synthetic_forecast(["a", "b", "c"]).to_dict()
    (sts / "gate.json").write_text(json.dumps({
        "format": "sts-gate/1", "score": "sts_icl", "protected": ["b"], "targets": ["a", "b", "c"],
        "candidates": {"math": {"name": "math", "accepted": True, "reason": "ok"},
                       "web": {"name": "web", "accepted": False, "reason": "b ranks 1"}},
        "forecasts": {"math": forecast, "web": forecast}, "weights": {"math": 1.0}}))
    html_path, md_path = write_report(sts)
    page, md = html_path.read_text(), md_path.read_text()
    for text in (page, md):
        assert "re-check" not in text and "No forecast" not in text and "demonstrations" not in text
        assert "gate decision (gate.json)" in text and "accepted: math; rejected: web" in text
    assert "from sts/ (gate.json)." in page and "from sts/ (gate.json)." in md
    assert "<b>model</b> tiny" in page  # the candidates' forecasts name the model
    # a run folder: the footer lists what that folder holds
    synthetic_forecast(["a", "b", "c"]).save(sts / "forecast.json")
    (sts / "gate.json").unlink()
    assert "from sts/ (forecast.json)." in write_report(sts)[0].read_text()


@pytest.mark.parametrize("subdir", ["sts", "sts_math"])
def test_a_gate_decision_beside_a_run_folder_reports_both(tmp_path, subdir):
    """`sts gate` with output: run/gate.json beside a callback's run/sts/: `sts report run` once reported the gate
    alone ("no training run") into run/; it now reports the run, in its folder, with the folder's gate decision."""
    run = tmp_path / "run"
    (run / subdir).mkdir(parents=True)
    synthetic_forecast(["a", "b", "c"]).save(run / subdir / "forecast.json")
    (run / "gate.json").write_text(json.dumps({
        "format": "sts-gate/1", "score": "sts_icl", "protected": ["b"], "targets": ["a", "b", "c"],
        "candidates": {"math": {"name": "math", "accepted": True, "reason": "ok"}}, "weights": {"math": 1.0}}))
    assert sts_main(["report", str(run)]) == 0
    assert not (run / "report.html").exists()
    page, md = (run / subdir / "report.html").read_text(), (run / subdir / "report.md").read_text()
    assert "no training run" not in page + md and 'id="gate"' in page and "math accepted (ok)" in md
    assert f"from {subdir}/ (forecast.json, ../gate.json)." in md
    # the run's folder itself: its own files only (the gate is the parent's, given only when asked for the parent)
    assert "Gate decision" not in write_report(run / subdir)[1].read_text()
    # a folder with only a gate and an empty sts/: the gate decision, as before
    (run / subdir / "forecast.json").unlink()
    for name in ("report.html", "report.md"):
        (run / subdir / name).unlink()
    assert "gate decision (gate.json)" in write_report(run)[1].read_text()


def test_the_validation_correlation_quoted_is_the_one_validation_json_holds(tmp_path):
    """With several seeds the report used to correlate the first seed's forecast with the seeds' mean |change|, a
    number validation.json does not hold; it now quotes validation.json's mean r against |Δ| and each seed's."""
    from fake_validation import fake_validation

    names = ["law", "code", "food", "chem"]
    seed0 = {d: {"sts_icl": s, "sts_act": 1.0 + s} for d, s in zip(names, (3.0, 2.9, 2.1, 1.6))}
    seed1 = {d: {"sts_icl": s, "sts_act": 1.0 + s} for d, s in zip(names, (1.7, 2.2, 3.2, 1.4))}
    changes = [{"law": -0.005, "code": -0.005, "food": -0.003, "chem": -0.008},
               {"law": -0.007, "code": -0.004, "food": -0.003, "chem": -0.0066}]
    result = fake_validation([seed0, seed1], changes)
    sts = tmp_path / "sts"
    sts.mkdir()
    result.save(sts / "validation.json")
    synthetic_forecast(names).save(sts / "forecast.json")
    saved = json.loads((sts / "validation.json").read_text())["correlations"]["nll"]["sts_icl"]["abs"]
    per_seed = saved["pearson"]["values"]
    html_path, md_path = write_report(sts)
    page, md = html.unescape(html_path.read_text()), md_path.read_text().replace("\\|", "|")
    for text in (page, md):
        assert f"Pearson r = {saved['pearson']['mean']:.2f}" in text and f"ρ = {saved['spearman']['mean']:.2f}" in text
        assert f"Pearson seed 0 {per_seed[0]:+.2f}, seed 1 {per_seed[1]:+.2f}" in text
        assert "mean over 2 seeds of each seed's r" in text and "|Δ|" in text
        assert "correlations.nll.sts_icl.abs" in text
    # one seed: its own r, said to be that seed's, with its p
    fake_validation([seed0], changes[:1]).save(sts / "validation.json")
    one = json.loads((sts / "validation.json").read_text())["per_seed"][0]["correlations"]["nll"]["sts_icl"]["abs"]
    md = write_report(sts)[1].read_text()
    assert f"Pearson r = {one['pearson']['r']:.2f}" in md and "(seed 0; Pearson p = " in md


def test_a_history_jsonl_of_another_tool_is_refused_and_stray_lines_are_counted(tmp_path, capsys):
    """history.jsonl with no re-check record (another tool's log: epoch, loss, step) is refused, naming the file;
    one with some stray lines is reported without them, saying how many were skipped and why."""
    sts = tmp_path / "sts"
    sts.mkdir()
    foreign = [{"epoch": 1, "loss": 2.3, "step": 100}, {"epoch": 2, "loss": 2.1, "step": 200}]
    (sts / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in foreign))
    with pytest.raises(STSInputError, match=r"sts/history\.jsonl was not written by STSCallback: none of its 2 line"):
        write_report(tmp_path)
    assert sts_main(["report", str(tmp_path)]) == 2
    assert "was not written by STSCallback" in capsys.readouterr().err and not (sts / "report.md").exists()
    # a folder of failed re-checks only: reported as before
    failed = {"step": 4, "error": "OutOfMemoryError: boom", "traceback": "..."}
    (sts / "history.jsonl").write_text(json.dumps(failed) + "\n")
    assert "holds only failed re-checks" in write_report(sts)[1].read_text()
    # re-checks among stray lines (one not even an object): those are skipped, and said to be
    recheck = {"step": 2, "scores": {"a": {"sts_act": 1.0}}, "loss_delta": {"a": 0.01}, "shifted_latents": [1]}
    lines = [json.dumps(r) for r in (recheck, *foreign, failed)] + ["[1, 2]"]
    (sts / "history.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"3 line\(s\) of .*history\.jsonl skipped: not re-check records"):
        html_path, md_path = write_report(sts)
    page, md = html.unescape(html_path.read_text()), md_path.read_text()
    for text in (page, md):
        assert "3 line(s) of" in text and "not re-check records of STSCallback" in text
    assert "**Re-checks:** 1 (and 1 failed), last at step 2" in md  # the failed one counted apart, not lost
    assert "step 4: re-check failed (OutOfMemoryError: boom)" in md
    assert "Re-checks: 1 (and 1 failed)" in page
    # its record has no overlap (written before the field existed, or its probe failed): not "– of – latents"
    assert "overlap" not in next(line for line in md.splitlines() if line.startswith("**Re-checks:**"))


def test_an_output_dir_whose_results_are_in_an_output_subdir(tmp_path, capsys):
    """A run whose callback wrote into output_subdir="sts_a" (no sts/): `sts report OUTPUT_DIR` reads sts_a/; with
    several such subfolders it names them and asks for one."""
    run = tmp_path / "run"
    (run / "checkpoint-2" / "sts_a").mkdir(parents=True)  # checkpoints' copies are not candidates
    synthetic_forecast(["law", "food"]).save(run / "sts_a" / "forecast.json")
    assert sts_main(["report", str(run)]) == 0
    assert str(run / "sts_a" / "report.html") in capsys.readouterr().out
    assert (run / "sts_a" / "report.md").exists() and not (run / "report.md").exists()
    synthetic_forecast(["law", "food"]).save(run / "sts_b" / "forecast.json")
    assert sts_main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "its subfolders sts_a/, sts_b/ do" in err and f"sts report {run / 'sts_a'}" in err
    with pytest.raises(STSInputError, match="sts_a/, sts_b/"):
        write_report(run)


def page_text(page: str) -> str:
    """The visible text of a report page, one space between words."""
    page = re.sub(r"<img[^>]*>|<style>.*?</style>", "", page, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))).strip()


def summary_status(page: str) -> str:
    return page_text(re.search(r"<h2>Summary (.*?)</h2>", page).group(1))


def timeline_row(page: str, step: int) -> list[str]:
    timeline = page[page.index('id="timeline"'):]
    for row in re.findall(r"<tr>(.*?)</tr>", timeline, flags=re.S):
        cells = [page_text(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)]
        if cells and cells[0] == str(step):
            return cells
    raise AssertionError(f"no timeline row for step {step}")


def test_projected_warnings_are_warnings_on_every_page_and_a_stopped_run_is_never_ok(tmp_path):
    """A re-check whose only warning is projected (measured within the tolerance, on course past it) was 'no
    warnings' / 'ok' in the HTML while the Markdown listed it, even beside an early stop."""
    sts = tmp_path / "sts"
    synthetic_forecast(["food", "chem"]).save(sts / "forecast.json")
    (sts / "settings.json").write_text(json.dumps({"protected": ["food"], "tolerance": 0.05}))
    warning = "protected domain 'food' is on course to get worse by 12.0% by the end of training"
    quiet = {"step": 2, "scores": {"food": {"sts_act": 1.0}, "chem": {"sts_act": 0.5}}, "shifted_latents": [1],
             "loss_delta": {"food": 0.01, "chem": 0.0}, "violations": []}
    foreseen = {**quiet, "step": 4, "loss_delta": {"food": 0.04, "chem": 0.01}, "early_forecast": {"food": 0.12},
                "lr_area_fraction": 0.33, "projected_warnings": [warning]}

    def report(*records):
        (sts / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        html_path, md_path = write_report(sts)
        return html_path.read_text(), md_path.read_text()

    page, md = report(quiet, foreseen)
    assert summary_status(page) == "projected warnings"
    summary = page[page.index('class="summary"'):]
    assert f"step 4 projected : {warning}" in page_text(summary[:summary.index("</section>")])
    assert timeline_row(page, 2)[1] == "ok" and timeline_row(page, 4)[1] == "projected warning"
    assert timeline_row(page, 4)[-1] == f"projected: {warning}"
    assert f"- step 4 (projected): {html.escape(warning, quote=False)}" in md
    stopped = {**foreseen, "early_stop": f"early stop at step 4: {warning}"}
    page, md = report(quiet, stopped)
    assert summary_status(page) == "projected warnings early stop"
    assert timeline_row(page, 4)[1] == "projected warning early stop"
    # a stop with no warning of either kind recorded: still not "no warnings" / "ok"
    page, _ = report(quiet, {**quiet, "step": 4, "early_stop": "early stop at step 4"})
    assert summary_status(page) == "early stop" and timeline_row(page, 4)[1] == "early stop"
    page, _ = report(quiet, {**quiet, "step": 4})
    assert summary_status(page) == "no warnings" and timeline_row(page, 4)[1] == "ok"


def test_a_domain_the_report_protects_and_the_run_did_not_is_judged_against_the_tolerance(tmp_path):
    """`sts report --protected chem` marked chem protected beside a +133% change and said "No warnings": the
    warnings were only those the run recorded under its own protected list."""
    sts = tmp_path / "sts"
    synthetic_forecast(["food", "chem"]).save(sts / "forecast.json")
    (sts / "settings.json").write_text(json.dumps({"protected": [], "tolerance": 0.02}))
    records = [{"step": 2, "scores": {}, "shifted_latents": [1], "loss_delta": {"food": 0.01, "chem": 0.01},
                "violations": []},
               {"step": 4, "scores": {}, "shifted_latents": [1], "loss_delta": {"food": 0.01, "chem": 1.335},
                "violations": []}]
    (sts / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    html_path, md_path = write_report(sts, protected=["chem"])
    md, page = md_path.read_text(), html_path.read_text()
    assert "No warnings" not in md and "step 4: chem: held-out loss +133.5%, above the tolerance 2.0%" in md
    assert summary_status(page) == "warnings" and "judged by this report" in page_text(page)
    assert timeline_row(page, 4)[1] == "warning" and timeline_row(page, 2)[1] == "ok"  # the timeline says it too
    _, md_path = write_report(sts)  # the run's own (empty) protected list: nothing judged
    assert "No warnings." in md_path.read_text()


def test_the_train_start_warnings_are_in_the_report_with_the_rechecks(tmp_path):
    """A run warned at train start (a protected domain ranked most affected, or predicted above the tolerance)
    had a report saying "No warnings.": the warnings went to the console only."""
    sts = tmp_path / "sts"
    sts.mkdir()
    warned = "STS calibrated forecast: protected domain 'a' is predicted to get worse by 3.1% (90% interval ...)"
    (sts / "settings.json").write_text(json.dumps({"protected": ["a"], "tolerance": 0.02,
                                                   "train_start_warnings": [warned]}))
    record = {"step": 2, "scores": {"a": {"sts_act": 1.0}}, "shifted_latents": [1], "loss_delta": {"a": 0.001},
              "violations": [], "lr_area_fraction": 1.0}
    (sts / "history.jsonl").write_text(json.dumps(record) + "\n")
    html_path, md_path = write_report(sts)
    md, page = md_path.read_text(), html_path.read_text()
    assert f"- train start: {warned}" in md and "No warnings." not in md
    assert warned in page_text(page) and summary_status(page) == "train-start warnings"


def test_the_sae_fit_drifting_during_the_run_is_in_the_report(tmp_path):
    """A re-check finding the SAE fits the trained weights less and less warned on the console only."""
    sts = tmp_path / "sts"
    sts.mkdir()
    (sts / "settings.json").write_text(json.dumps({"protected": [], "tolerance": 0.05}))
    drift = "The SAE fits the trained weights less and less: fraction of variance unexplained 0.52 now vs 0.30 ..."
    records = [{"step": s, "scores": {"a": {"sts_act": 1.0}}, "shifted_latents": [1], "loss_delta": {"a": 0.001},
                "violations": [], "lr_area_fraction": s / 4, **({"sae_fit_warning": drift} if s == 2 else {})}
               for s in (2, 4)]
    (sts / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    html_path, md_path = write_report(sts)
    md, page = md_path.read_text(), html_path.read_text()
    assert f"- step 2: {drift}" in md and "No warnings." not in md
    assert drift in page_text(page) and summary_status(page) == "warnings"


def test_a_run_whose_forecast_file_was_cut_still_gets_its_report(tmp_path):
    """A resumed run goes on without a cut forecast.json (warned), but every report it wrote after failed on the
    file and the folder kept the earlier run's report; `sts report` failed too."""
    sts = tmp_path / "sts"
    sts.mkdir()
    (sts / "forecast.json").write_text('{"format": "sts-forecast/1", "domains": {"a"')
    record = {"step": 2, "scores": {"a": {"sts_act": 1.0}}, "shifted_latents": [1], "loss_delta": {"a": 0.01},
              "violations": [], "lr_area_fraction": 0.5}
    (sts / "history.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.warns(STSDataWarning, match="not valid JSON.*the report shows the run's re-checks"):
        _, md_path = write_report(sts)
    md = md_path.read_text()
    assert "The forecast cannot be read" in md and "+1.0%" in md
    (sts / "history.jsonl").unlink()  # a forecast's own folder: nothing else to show, so an error
    with pytest.raises(STSInputError, match="not valid JSON"):
        write_report(sts)


def test_numbers_never_contradict_themselves(tmp_path):
    """Seconds of a short run's overhead were rounded to 0 beside a share of 423%; a nonzero interval bound printed
    +0.0 and a change past the tolerance printed as the tolerance."""
    sts = tmp_path / "sts"
    sts.mkdir()
    (sts / "settings.json").write_text(json.dumps({"protected": ["a"], "tolerance": 0.05}))
    record = {"step": 2, "scores": {"a": {"sts_act": 1.0}, "b": {"sts_act": 2.0}}, "shifted_latents": [1],
              "loss_delta": {"a": 0.0502, "b": 0.01}, "loss_delta_ci": {"a": [0.0004, 0.1], "b": [-0.0004, 0.02]},
              "lr_area_fraction": 0.5,
              "overhead": {"share": 4.2316, "budget": None, "train_seconds": 0.0359, "recheck_seconds": 0.1519,
                           "skipped": []}}
    (sts / "history.jsonl").write_text(json.dumps(record) + "\n")
    html_path, md_path = write_report(sts)
    page, md = page_text(html_path.read_text()), md_path.read_text()
    for text in (page, md):
        assert "Re-checks so far took 423.2% of training time: 0.15 s against 0.036 s." in text
    assert "a +5.02% [+0.04, +10.00] (protected), b +1.00% [-0.04, +2.00]" in md  # one precision a row
    assert "a +5.02% [+0.04, +10.00], b +1.00% [-0.04, +2.00]" in page
    record["overhead"] = {"share": 0.0502, "budget": 0.05, "train_seconds": 120.4, "recheck_seconds": 6.04,
                          "skipped": ["b"]}
    (sts / "history.jsonl").write_text(json.dumps(record) + "\n")
    assert ("Re-checks so far took 5.02% of training time (budget 5.0%): 6 s against 120 s; waiting their turn: b."
            in write_report(sts)[1].read_text())
    # b was measured here, so nothing went unmeasured; at the run's end the cost is the run's, not "so far"
    assert "no re-check measured" not in write_report(sts)[1].read_text()
    record["lr_area_fraction"] = 1.0
    (sts / "history.jsonl").write_text(json.dumps(record) + "\n")
    assert "Re-checks took 5.02% of training time" in write_report(sts)[1].read_text()


def calibrated_forecast(names: list[str], means: dict[str, float], calibration: dict) -> Forecast:
    forecast = synthetic_forecast(names)
    forecast.predictions = {name: {"mean": m, "low": m - 0.02, "high": m + 0.02, "level": 0.9,
                                   "label": "loss" if m > 0.02 else "flat"} for name, m in means.items()}
    forecast.settings["calibration"] = calibration
    return forecast


BUILTIN_CALIBRATION = {
    "source": "built-in gemma3-270m-lora", "features": ["sts_icl"], "n": 170, "excluded": ["d"],
    "fitted_on": {"model": "Gemma 3 270M", "sae": "the demo SAE", "runs": 17, "units": ["lora-math-seed0"],
                  "scope": {"model_class": "Gemma3ForCausalLM", "d_sae": 4096}},
    "scope_problems": ["model_class 'LlamaForCausalLM' (calibrated on 'Gemma3ForCausalLM')",
                       "d_sae 64 (calibrated on 4096)"]}


def test_the_summary_leads_with_the_calibrated_prediction_in_its_order(tmp_path):
    """With predictions the headline followed the raw scores (d, c, b here) while the calibrated table beside it
    ordered the domains otherwise; it now follows the prediction, most harmed first, and says so."""
    sts = tmp_path / "sts"
    names = ["a", "b", "c", "d"]
    synthetic_forecast(names).save(sts / "forecast.json")
    page = write_report(sts)[0].read_text()
    raw = [name for name, _ in Forecast.load(sts / "forecast.json").ranked()]
    assert raw[:3] == ["d", "c", "b"]
    assert "Most affected by this training (forecast, STS_icl): d , c , b ." in page_text(page)  # no predictions
    means = {"a": 0.05, "b": 0.03, "c": -0.01}
    calibrated_forecast(names, means, {**BUILTIN_CALIBRATION, "scope_problems": []}).save(sts / "forecast.json")
    page = write_report(sts)[0].read_text()
    assert ("Most affected by this training (calibrated prediction of the held-out loss change, most harmed first): "
            "a +5.0%, b +3.0%.") in page_text(page)  # c gains: no harm to list
    # every domain gaining: the largest changes, not the least improved as "most harmed"
    calibrated_forecast(names, {"a": -0.06, "b": -0.03, "c": -0.15}, {**BUILTIN_CALIBRATION, "scope_problems": []}
                        ).save(sts / "forecast.json")
    assert ("No domain is predicted to get worse (calibrated prediction of the held-out loss change); the largest "
            "changes: c -15.0%, a -6.0%, b -3.0%.") in page_text(write_report(sts)[0].read_text())
    table = re.findall(r'<tr class="prediction [^"]*" data-domain="([^"]*)"', page)
    assert table == ["a", "b", "c", "d"]  # the table's order; d (not predicted) last


def test_the_prediction_names_its_calibration_its_scope_and_the_domains_it_left_out(tmp_path):
    """The report never said which calibration made the predictions or that it was applied out of its scope, and
    dropped the domains the calibration excluded without a word."""
    sts = tmp_path / "sts"
    names = ["a", "b", "c", "d"]
    calibrated_forecast(names, {"a": 0.05, "b": 0.03, "c": -0.01}, BUILTIN_CALIBRATION).save(sts / "forecast.json")
    (sts / "settings.json").write_text(json.dumps({"protected": ["d"]}))
    html_path, md_path = write_report(sts)
    page, md = page_text(html_path.read_text()), md_path.read_text()
    named = ("Calibration: built-in gemma3-270m-lora, fitted on 170 measured changes of 17 training runs "
             "(model Gemma 3 270M; SAE the demo SAE).")
    caution = ("Caution: the calibration was fitted on another setup (model_class 'LlamaForCausalLM' (calibrated on "
               "'Gemma3ForCausalLM'); d_sae 64 (calibrated on 4096)): these predictions do not carry over")
    assert named in page and caution in page and "these predictions do not carry over" in page[:page.index(named)]
    assert html.escape(named, quote=False) in md and f"**{html.escape(caution, quote=False)}" in md
    assert "d protected – – not predicted (excluded when the calibration was applied)" in page
    assert "| d ⚠️ protected | – | – | not predicted (excluded when the calibration was applied) |" in md
    # within its scope: named, no caution
    calibrated_forecast(names, {"a": 0.05, "b": 0.03, "c": -0.01},
                        {**BUILTIN_CALIBRATION, "scope_problems": []}).save(sts / "forecast.json")
    html_path, md_path = write_report(sts)
    for text in (page_text(html_path.read_text()), md_path.read_text()):
        assert "built-in gemma3-270m-lora" in text and "Caution" not in text and "another setup" not in text
        assert "Not in the calibration's runs" not in text
    # a domain the calibration never saw: said as the console says it (the report had left it out)
    calibrated_forecast(names, {"a": 0.05, "b": 0.03, "c": -0.01},
                        {**BUILTIN_CALIBRATION, "scope_problems": [], "unseen_domains": ["c"]}).save(sts / "forecast.json")
    html_path, md_path = write_report(sts)
    for text in (page_text(html_path.read_text()), md_path.read_text()):
        assert "Not in the calibration's runs: c (the average domain's level" in text
    assert Forecast.load(sts).predictions == Forecast.load(sts / "forecast.json").predictions  # its folder too
    # a forecast written before calibrations were named (no source, no scope_problems): what it records is said
    old = {**{k: v for k, v in BUILTIN_CALIBRATION.items() if k not in ("source", "scope_problems")}, "excluded": []}
    old["fitted_on"] = {"training_runs": ["run1", "run2"], "steps": [8, 8],
                        "scope": {"model_class": "LlamaForCausalLM", "d_sae": 64}}
    calibrated_forecast(names, {"a": 0.05, "b": 0.03, "c": -0.01, "d": 0.0}, old).save(sts / "forecast.json")
    html_path, md_path = write_report(sts)
    for text in (page_text(html_path.read_text()), md_path.read_text()):
        assert ("Calibration: fitted on 170 measured changes of 2 training runs (model_class LlamaForCausalLM; "
                "d_sae 64).") in text
        assert "Caution" not in text and "not predicted" not in text


def test_figures_tell_many_domains_apart_and_keep_long_names_short():
    """A 250-character domain name squeezed the plot area to a strip; past ten domains, tab10's colours repeated
    with the same marker, so domains 1 and 11 could not be told apart in a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sts_callback.reporting.report import LABEL_CHARS, series_style, short_label

    long = "a_domain_" + "x" * 230 + "_its_end"
    label = short_label(long)
    assert len(label) == LABEL_CHARS and label.startswith("a_domain_") and label.endswith("_its_end")
    assert short_label("law") == "law"
    styles = [series_style(plt, i) for i in range(30)]
    keys = {(s["color"], s["marker"], s["linestyle"]) for s in styles}
    assert len(keys) == 30


def test_the_timeline_charts_the_forecasts_score_when_the_first_domain_lacks_it(tmp_path):
    """The re-checks' chart took its score from the first domain only: a one-text domain first (no STS_icl) put
    every domain on STS_act; it is left out of that chart instead."""
    from sts_callback.reporting.report import ReportData

    sts = tmp_path / "sts"
    synthetic_forecast(["one", "law"]).save(sts / "forecast.json")
    record = {"step": 2, "shifted_latents": [1], "loss_delta": {"one": 0.01, "law": 0.02},
              "scores": {"one": {"sts_act": 0.4}, "law": {"sts_icl": 3e-4, "sts_act": 0.2}}}  # as re-checks record it
    (sts / "history.jsonl").write_text(json.dumps(record) + "\n")
    data = ReportData(sts)
    data.variant = "sts_icl"
    assert data.recheck_variant() == "sts_icl"
    html_path, _ = write_report(sts)  # draws the timeline without the one-text domain's STS_act
    assert html_path.exists()


def test_rechecks_that_took_turns_or_lost_their_probe_are_reported_whole(tmp_path, monkeypatch):
    """A last re-check whose probe failed (scores {}) left the timeline with no domain line and its probe_error
    unsaid; re-checks taking turns (loss_domains) compared the forecast with the last one's two domains only and
    dropped the others unsaid; report.md's ranking hid protected domains below its top 5."""
    import matplotlib.axes

    from sts_callback.reporting.report import ReportData, plot_timeline

    names = [f"d{i}" for i in range(8)]
    sts = tmp_path / "sts"
    synthetic_forecast(names).save(sts / "forecast.json")
    protected = "d0"  # ranks last of 8 by the synthetic forecast's STS_icl
    (sts / "settings.json").write_text(json.dumps({"protected": [protected], "tolerance": 0.05}))

    def record(step, measured, probe_error=None):
        return {"step": step, "shifted_latents": [1], "loss_delta": {n: 0.01 * step for n in measured},
                "scores": {} if probe_error else {n: {"sts_icl": 1.0} for n in names},
                **({"probe_error": probe_error} if probe_error else {})}

    turns = [names[1:4], names[4:7], [names[7], protected]]
    history = [record(2 * (i + 1), measured) for i, measured in enumerate(turns)]
    history[-1] = record(6, turns[-1], probe_error="the probe's residuals are not finite")
    (sts / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    _, md_path = write_report(sts)
    md = md_path.read_text()
    assert "The probe could not be read at step(s) 6 (the probe's residuals are not finite)" in md
    assert "Measured at earlier re-checks (the re-checks took turns): d1 +2.0% at step 2" in md
    assert "at each domain's latest re-check (steps 2-6) over 8 domains" in md  # every domain compared
    assert f"| 8 | {protected} |" in md and "| … | 2 more | | |" in md
    drawn = []
    real_plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **k: drawn.append(k.get("label")) or real_plot(self, *a, **k))
    assert plot_timeline(ReportData(sts)) is not None
    assert {n for n in names} <= {label.removesuffix(" (protected)") for label in drawn if label}


def test_the_report_says_what_the_shift_was_measured_on_and_what_it_leaves_out(tmp_path):
    sts = tmp_path / "sts"
    forecast = synthetic_forecast(["law", "food"])
    forecast.settings.update({"shift": "chosen_vs_rejected", "left_out": "the log-likelihood of the reference answers"})
    forecast.save(sts / "forecast.json")
    html_path, md_path = write_report(tmp_path)
    page, md = html_path.read_text(), md_path.read_text()
    for text in (page, md):  # not "in-context estimate": a preference run's latents come from its pairs
        assert "chosen minus rejected completions" in text and "left out: the log-likelihood" in text
    assert "in-context estimate" not in page
    # which way each latent moved says so of the pairs, not of a context there was none of
    assert "↑ more active in chosen than rejected" in page and "↓ less active in chosen than rejected" in page
    assert "active in context" not in page


def test_a_run_that_ended_with_earlier_weights_is_not_projected_to_an_end_it_has_passed(tmp_path):
    """With load_best_model_at_end loading step 2 of 6, report.md projected step 2's change "at the end of
    training" (-23% beside a measured -9%) and quoted step 2's cost for all six re-checks."""
    sts = tmp_path / "sts"
    synthetic_forecast(["food", "chem"]).save(sts / "forecast.json")
    (sts / "settings.json").write_text(json.dumps({"protected": ["food"], "tolerance": 0.05}))

    def record(step, share, seconds):
        return {"step": step, "scores": {"food": {"sts_act": 1.0}}, "shifted_latents": [1],
                "loss_delta": {"food": -0.09, "chem": -0.02}, "violations": [], "lr_area_fraction": share,
                "early_forecast": {"food": -0.23, "chem": -0.07},
                "early_blend": {"early": 0.5},  # a blend without its step-0 weight: no KeyError
                "overhead": {"share": 0.1, "recheck_seconds": seconds, "train_seconds": 10.0 * step}}

    def report(*records):
        (sts / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return write_report(sts)[1].read_text()

    history = [record(2, 0.52, 0.84), record(4, 0.8, 1.7), record(6, 0.99, 2.5)]
    md = report(*history)
    assert "Projected at the end of training (the measured changes extrapolated by the early rule, 99%" in md
    md = report(*history[:-1], {**history[-1], "loaded_best_step": 2})
    assert "ends with step 2's weights" in md and "Projected" not in md
    assert "2.5 s against 60 s" in md  # the cost of every re-check, not of those up to step 2
    md = report(history[0], {**history[1], "ended_early": {"max_steps": 8}})
    assert "Training ended at step 4" in md and "Projected" not in md
    md = report(history[0], {**history[1], "early_stop": "early stop at step 4: food"})
    assert "Projected at the end of training, had it gone on" in md
    # a failed last re-check was made: it is no missing one
    md = report(history[0], history[1], {"step": 6, "error": "RuntimeError: boom"})
    assert "the re-check at step 6 failed" in md and "had not ended" not in md
    # a run that does not re-check its end is not "unfinished"
    (sts / "settings.json").write_text(json.dumps({"protected": ["food"], "tolerance": 0.05, "recheck_at_end": False}))
    md = report(history[0], history[1])
    assert "does not re-check its end (recheck_at_end=False)" in md and "had not ended" not in md
    (sts / "settings.json").write_text(json.dumps({"protected": ["food"], "tolerance": 0.05}))
    assert "had not ended" in report(history[0], history[1])
    # the projection's interval, which the console's warnings gave, in the summary and in the HTML table
    with_ci = {**history[1], "early_forecast_ci": {"food": [-0.3, -0.16], "chem": [None, None]}}
    md = report(history[0], with_ci)
    assert "food -23.0% [-30.0%, -16.0%], chem -7.0%." in md
    html = (sts / "report.html").read_text()
    assert "food -23.0% [-30.0%, -16.0%]" in html and "projected at the end of training [95% interval]" in html


GOOD_RECHECK = {"step": 2, "scores": {"food": {"sts_act": 1.0}}, "shifted_latents": [1],
                "loss_delta": {"food": 0.01}, "lr_area_fraction": 0.5,
                "overhead": {"share": 0.1, "recheck_seconds": 1.0, "train_seconds": 10.0}}


@pytest.mark.parametrize("damage, named", [
    (lambda sts: (sts / "settings.json").write_text("[1, 2]"), "settings.json holds a list"),
    (lambda sts: (sts / "settings.json").write_text('{"protected": ["food"], "tolerance": "0.05"}'),
     "do not read as STS wrote them"),
    (lambda sts: (sts / "history.jsonl").write_text(json.dumps({**GOOD_RECHECK, "ended_early": True}) + "\n"),
     "do not read as STS wrote them"),
    (lambda sts: (sts / "history.jsonl").write_text(json.dumps({**GOOD_RECHECK, "overhead": {"share": 0.1}}) + "\n"),
     "do not read as STS wrote them"),
    (lambda sts: (sts / "history.jsonl").write_bytes(b'{"step": 2, "note": "\xff\xfe"}\n'), "history.jsonl"),
    (lambda sts: ((sts / "history.jsonl").unlink(), (sts / "history.jsonl").mkdir()), "cannot be read"),
])
def test_sts_report_names_a_file_it_cannot_read_instead_of_a_traceback(tmp_path, capsys, damage, named):
    """Hand-edited or odd files in a run folder failed `sts report` with a bare AttributeError, TypeError,
    KeyError, UnicodeDecodeError or IsADirectoryError (exit 1)."""
    sts = tmp_path / "sts"
    synthetic_forecast(["food", "chem"]).save(sts / "forecast.json")
    (sts / "settings.json").write_text(json.dumps({"protected": ["food"], "tolerance": 0.05}))
    (sts / "history.jsonl").write_text(json.dumps(GOOD_RECHECK) + "\n")
    damage(sts)
    assert sts_main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sts: error: ") and "Traceback" not in err and named in err, err


def test_the_validation_noise_ceiling_is_called_noisy_only_below_the_goal(tmp_path):
    """The report called the changes "noisy" at any noise ceiling (0.98 too), in the HTML only."""
    from fake_validation import fake_validation

    names = ["law", "code", "food", "chem"]
    scores = {d: {"sts_icl": s, "sts_act": 1.0 + s} for d, s in zip(names, (3.0, 2.9, 2.1, 1.6))}
    sts = tmp_path / "sts"
    sts.mkdir()
    fake_validation([scores], [{"law": -0.005, "code": -0.004, "food": -0.003, "chem": -0.008}]).save(
        sts / "validation.json")
    synthetic_forecast(names).save(sts / "forecast.json")
    saved = json.loads((sts / "validation.json").read_text())
    for ceiling, noisy in ((0.98, False), (0.6, True)):
        (sts / "validation.json").write_text(json.dumps({**saved, "noise_ceiling": ceiling}))
        html_path, md_path = write_report(sts)
        for text in (html.unescape(html_path.read_text()), md_path.read_text()):
            assert f"about {ceiling:.2f}" in text
            assert ("The measured changes are noisy" in text) is noisy


def test_a_forecast_alone_reports_the_saes_poor_fit_it_warned_of(tmp_path):
    """`sts forecast` warned "FVU 3782 ... makes the forecast meaningless" and kept the fit in forecast.json;
    its report showed the table with no word of it (a training run's report lists it among its warnings)."""
    sts = tmp_path / "sts"
    sts.mkdir()
    forecast = synthetic_forecast(["law", "code", "food"])
    forecast.settings["sae_fit"] = {"fvu": 3782.0, "l0": 30.0, "tokens": 200}
    forecast.save(sts / "forecast.json")
    html_path, md_path = write_report(sts)
    for text in (html.unescape(html_path.read_text()), md_path.read_text()):
        assert "reconstructs this model's residual stream poorly" in text and "3782" in text
        assert "train start" not in text  # no training: the forecast's own warning
    assert "- forecast: The SAE reconstructs" in md_path.read_text()
    forecast.settings["sae_fit"] = {"fvu": 0.3, "l0": 30.0, "tokens": 200}
    forecast.save(sts / "forecast.json")
    assert "poorly" not in write_report(sts)[1].read_text()


def test_a_change_and_its_interval_are_shown_with_one_precision():
    """Each number got its own decimals: -0.043% [-0.051, -0.034] read "-0.04% [-0.1, -0.03]" (a bound twice its
    size) and -0.073% [-0.086, -0.060] read "-0.1% [-0.1, -0.1]", an interval of no width."""
    from sts_callback.core.formatting import percent, signed_percents
    from sts_callback.reporting.report import _changes, _projections

    record = {"loss_delta": {"chem": -0.00043, "law": -0.00073, "food": 0.0512},
              "loss_delta_ci": {"chem": [-0.00051, -0.00034], "law": [-0.00086, -0.00060], "food": [0.031, 0.071]},
              "early_forecast": {"law": -0.00073}, "early_forecast_ci": {"law": [-0.00086, -0.00060]}}
    assert _changes(record, tolerance=0.05) == ["chem -0.04% [-0.05, -0.03]", "law -0.07% [-0.09, -0.06]",
                                                "food +5.1% [+3.1, +7.1]"]
    assert _projections(record, 0.05) == [("law", "-0.07% [-0.09%, -0.06%]")]
    # a projection held at -100% (its interval too) is no certain fall to a loss of zero: said to be held there
    held = {"early_forecast": {"law": -1.0}, "early_forecast_ci": {"law": [-1.0, -1.0]}}
    assert "[" not in _projections(held, 0.05)[0][1] and "held there" in _projections(held, 0.05)[0][1]
    assert signed_percents([0.05, 0.0499, 0.0501], apart_from=0.05) == ["+5.00%", "+4.99%", "+5.01%"]
    assert signed_percents([0.0, None, float("nan")]) == ["+0.0%", "–", "nan"]
    # below the last place a nonzero value keeps its sign without reading as a signed zero
    assert signed_percents([-3e-6, 2e-5]) == ["-<0.001%", "+0.002%"] and percent(3e-6) == "<0.001%"


def test_names_that_markdown_or_the_plot_font_would_misread_are_shown_as_given(tmp_path):
    """'*food*' rendered in italics in report.md; a CJK name printed matplotlib's "Glyph ... missing" warning for
    every glyph of every figure, 12 times over a short run."""
    import warnings as warnings_module

    sts = tmp_path / "sts"
    synthetic_forecast(["*food*", "law_court", "_x_", "日本語 chem"]).save(sts / "forecast.json")
    with warnings_module.catch_warnings(record=True) as caught:
        warnings_module.simplefilter("always")
        md = write_report(sts)[1].read_text()
    assert not [w for w in caught if "Glyph" in str(w.message)]
    assert "\\*food\\*" in md and "law_court" in md and "\\_x\\_" in md and "日本語 chem" in md
    # a link, an image, a code span or a strike-through in a name (a dataset's) renders as the name, in GitHub's
    # Markdown; an interval's brackets keep no backslash
    from sts_callback.reporting.report import md_esc

    markdown_it = pytest.importorskip("markdown_it")  # (rich's dependency)
    render = markdown_it.MarkdownIt("commonmark").enable(["strikethrough", "table"]).render
    for name in ("[link](http://x)", "![img](x)", "[[a]](b)", "`tick`", "~~strike~~", "a\\b", "*food*", "_x_",
                 "__init__", "law_court"):
        assert html.unescape(re.sub(r"<[^>]+>", "", render(md_esc(name)))).strip() == name, name
    assert md_esc("food +5.0% [-1.0, +2.0]") == "food +5.0% [-1.0, +2.0]"
    forecast = synthetic_forecast(["law", "food"])
    forecast.settings["model"] = "/runs/_sft/checkpoint-500"  # in a code span, shown as typed: no escapes
    forecast.save(sts / "forecast.json")
    assert "Model `/runs/_sft/checkpoint-500`" in write_report(sts)[1].read_text()


def test_a_gate_decision_reads_as_a_decision_not_a_dump(tmp_path):
    """A gate-only folder's report showed raw JSON with full float precision, the candidate's name twice, the
    passes' counts and seconds, notes joined by commas, "probe tokens – (– queries)"; report.md left out the
    weights and the allocation."""
    gate = {"format": "sts-gate/1", "score": "sts_icl", "protected": ["food"], "targets": ["law", "food"],
            "candidates": {"lawset": {"name": "lawset", "accepted": True, "reason": "accepted: below the limit",
                                      "protected_scores": {"food": 0.0037415086597928373},
                                      "protected_ranks": {"food": 1}, "examples": 30}},
            "weights": {"lawset": 1.0}, "allocation": {"lawset": 33},
            "forward_calls": {"domains": 14}, "timings": {"total": 1.96},
            "notes": ["lawset is allocated 33 examples but has 30.", "a second note."]}
    (tmp_path / "gate.json").write_text(json.dumps(gate))
    html_path, md_path = write_report(tmp_path)
    page, md = page_text(html_path.read_text()), md_path.read_text()
    assert "0.0037415086597928373" not in page and "food 0.003742" in page
    assert "forward_calls" not in page and "timings" not in page and "probe tokens" not in page
    assert "name accepted reason" in " ".join(page.split()) and "candidate accepted" not in page  # one name column
    assert "| lawset | 1 | 33 |" in md and "- a second note." in md


def test_the_validation_table_and_its_report_say_one_thing_of_the_noise(tmp_path):
    """At a noise ceiling of 0.868 the console table said "about 0.86 ... raise loss_tokens" (below 0.9) while the
    report said "about 0.87 ... precise enough" (above 0.85); the validation's report also advised loss_precision,
    which validate does not take."""
    from fake_validation import fake_validation

    names = ["law", "code", "food", "chem"]
    changes = {"law": -0.005, "code": -0.004, "food": -0.003, "chem": -0.008}
    scores = {d: {"sts_icl": s, "sts_act": 1.0 + s} for d, s in zip(names, (3.0, 2.9, 2.1, 1.6))}
    sts = tmp_path / "sts"
    sts.mkdir()
    synthetic_forecast(names).save(sts / "forecast.json")
    for target in (0.868, 0.853, 0.6):
        result = fake_validation([scores], [changes])
        low, high = 0.0, 0.01  # the standard error that gives this ceiling
        for _ in range(60):
            result.per_seed[0].nll_delta_se = {d: (low + high) / 2 for d in names}
            low, high = ((low + high) / 2, high) if result.noise_ceiling > target else (low, (low + high) / 2)
        result.save(sts / "validation.json")
        md = write_report(sts)[1].read_text()
        table = result.table()
        shown = f"about {int(result.noise_ceiling * 100) / 100:.2f}"
        assert shown in table and shown in md
        assert ("raise loss_tokens" in table) is ("The measured changes are noisy" in md) is (target < 0.85)
        assert "loss_precision" not in md


def test_the_timeline_marks_each_warning_on_the_domain_it_names(tmp_path, monkeypatch):
    """The warning's X sat at the largest change of any domain (an unprotected +135%), not on the protected domain
    that broke the rule."""
    import matplotlib.axes

    from sts_callback.reporting.report import ReportData, plot_timeline

    sts = tmp_path / "sts"
    synthetic_forecast(["food", "chem", "quiz"]).save(sts / "forecast.json")
    (sts / "settings.json").write_text(json.dumps({"protected": ["food", "quiz"], "tolerance": 0.3}))
    history = [{"step": 1, "shifted_latents": [1], "loss_delta": {"food": 0.1, "chem": 0.2, "quiz": 0.1},
                "scores": {}},
               {"step": 2, "shifted_latents": [1], "loss_delta": {"food": 0.79, "chem": 1.35, "quiz": 0.64},
                "scores": {}, "violations": ["held-out loss of protected domain 'food' rose by 79.0%",
                                             "held-out loss of protected domain 'quiz' rose by 64.0%"]},
               {"step": 3, "shifted_latents": [1], "loss_delta": {"food": 0.2, "chem": 1.5, "quiz": 0.1},
                "scores": {}, "projected_warnings": ["protected domain 'food' is on course to get worse by 40%"]}]
    (sts / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    marked = {}
    real = matplotlib.axes.Axes.scatter

    def spy(self, x, y, *args, **kwargs):
        marked[kwargs.get("label")] = sorted(zip(x, y))
        return real(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", spy)
    assert plot_timeline(ReportData(sts)) is not None
    assert marked["warning"] == [(2, pytest.approx(64.0)), (2, pytest.approx(79.0))]
    assert marked["projected warning"] == [(3, pytest.approx(20.0))]


def test_an_early_stopped_runs_report_names_the_checkpoint_to_go_back_to_and_lists_warnings_in_step_order(tmp_path):
    """The report said "early stop at step 6" only: not that checkpoint-6 (or the model in memory) holds the
    harmed weights nor which checkpoint predates the harm; and its warnings came grouped by kind (a failure at step
    3 listed after step 6's)."""
    sts = tmp_path / "run" / "sts"
    synthetic_forecast(["food", "chem"]).save(sts / "forecast.json")
    (sts / "settings.json").write_text(json.dumps({"protected": ["food"], "tolerance": 0.3}))
    for step in (2, 4, 6):
        (tmp_path / "run" / f"checkpoint-{step}").mkdir()

    def record(step, food, **extra):
        return {"step": step, "shifted_latents": [1], "loss_delta": {"food": food, "chem": 0.1}, "scores": {}, **extra}

    history = [record(2, 0.1), {"step": 3, "error": "RuntimeError: out of memory"},
               record(4, 0.5, violations=["held-out loss of protected domain 'food' rose by 50.0%"]),
               record(5, 0.2, projected_warnings=["protected domain 'food' is on course to get worse by 40%"]),
               record(6, 0.6, violations=["held-out loss of protected domain 'food' rose by 60.0%"],
                      early_stop="early stop at step 6 after 2 consecutive re-check(s) with negative transfer")]
    (sts / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    md = write_report(sts)[1].read_text()
    assert ("The weights at the stop are the harmed ones (unless the trainer then loaded an earlier best checkpoint); "
            "the last re-check that broke no rule was at step 5, and the latest checkpoint saved at or before it is "
            "checkpoint-4") in md
    from sts_callback.reporting.report import ReportData

    listed = [(kind, step) for kind, step, _ in ReportData(sts).warning_items()]
    assert listed == [("failed", 3), ("warning", 4), ("projected", 5), ("warning", 6), ("early stop", 6)]


def test_sts_report_of_a_path_that_does_not_exist_says_so(tmp_path):
    from sts_callback.reporting.report import resolve_sts_dir

    with pytest.raises(STSInputError, match="does not exist"):
        resolve_sts_dir(tmp_path / "nonexistent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(STSInputError, match="is not a folder"):
        resolve_sts_dir(tmp_path / "file")


def test_a_folder_without_a_forecast_reports_no_overlap_with_it(tmp_path):
    """"No forecast in this folder" and "overlap with the forecast 3 of 8 latents" on one page."""
    sts = tmp_path / "sts"
    sts.mkdir()
    record = {"step": 2, "scores": {}, "shifted_latents": list(range(8)), "loss_delta": {"a": 0.01, "b": 0.02},
              "overlap_with_forecast": 3}
    (sts / "history.jsonl").write_text(json.dumps(record) + "\n")
    html_path, md_path = write_report(sts)
    for text in (md_path.read_text(), html.unescape(html_path.read_text())):
        assert "overlap" not in text.lower() or "forecast" not in text[text.lower().index("overlap"):][:60]
