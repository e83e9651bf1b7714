"""The demo's console story and its console / log routing, on a tiny real Trainer run (the Gemma demo itself
is too slow for the tests)."""

import io
import logging
import re
import sys
import warnings

import pytest
from datasets import Dataset
from tiny import TinySAE, domain_texts, make_model, make_tokenizer
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from sts_callback.integrations.callback import STSCallback
from sts_callback.tools.cli import main
from sts_callback.tools.demo import (
    DemoConsole,
    _LogStream,
    forecast_story,
    recheck_line,
    training_story,
    warning_lines,
)
from sts_callback.pipelines.forecast import DomainForecast, Forecast

DOMAINS = ("law", "food", "chem")
BAR = "%|"  # every tqdm bar has it ("STS forecast:  50%|█████     | 3/6 ...")


def tiny_run(tmp_path, disable_tqdm: bool):
    tokenizer = make_tokenizer()
    callback = STSCallback(sae=TinySAE(32, 64, hook_name="blocks.1.hook_resid_post"),
                           target_domains={d: domain_texts(d, 30) for d in DOMAINS}, protected=["chem"],
                           config={"n_shifted": 8, "shift_tokens": 200, "domain_tokens": 100,
                                   "n_domain_demonstrations": 2},
                           recheck_tokens=150, loss_tokens=120)
    train = Dataset.from_dict({"text": domain_texts("law", 64)}).map(lambda b: tokenizer(b["text"]), batched=True,
                                                                     remove_columns=["text"])
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, save_steps=2, logging_steps=1,
                             use_cpu=True, report_to=[], per_device_train_batch_size=4, learning_rate=1e-2,
                             save_strategy="steps", disable_tqdm=disable_tqdm)
    trainer = Trainer(model=make_model("llama"), args=args, train_dataset=train,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), processing_class=tokenizer,
                      callbacks=[callback])
    trainer.train()
    return callback


@pytest.mark.parametrize("disable_tqdm", [True, False], ids=["PrinterCallback", "ProgressCallback"])
def test_quiet_training_run_keeps_bars_and_dict_logs_in_the_log(tmp_path, capfd, disable_tqdm, request):
    log_path = tmp_path / "demo.log"
    # transformers' verbosity is global: an earlier test (or library) may have lowered it; this one needs warnings
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    request.addfinalizer(lambda: hf_logging.set_verbosity(previous))
    hf_logger = hf_logging.get_logger("transformers.demo_test")
    hf_handlers = [(h, getattr(h, "stream", None)) for h in logging.getLogger("transformers").handlers]
    with DemoConsole(log_path) as out:
        out.say("the story: training")
        callback = tiny_run(tmp_path, disable_tqdm)
        hf_logger.warning("a transformers warning")
        logging.getLogger("sts_callback").warning("an sts_callback log line")
        warnings.warn("a user warning", UserWarning)
        print("a stray print")
        for line in training_story(callback.history, steps=4, protected=["chem"], base_fit=callback.base_fit):
            out.say(line)
    console = capfd.readouterr()
    log = log_path.read_text()

    # the console: the story only
    assert "the story: training" in console.out
    assert "step 2/4: held-out loss" in console.out and "step 4/4: held-out loss" in console.out
    for noise in (BAR, "'loss'", "STS forecast", "ranked by", "a transformers warning", "a user warning",
                  "an sts_callback log line", "a stray print"):
        assert noise not in console.out and noise not in console.err, noise
    assert console.err == ""

    # the log: everything, each progress bar once in its final state (no redraws)
    # the callback's forecast bar, at its end, where the Trainer shows bars (disable_tqdm hides both)
    assert bool(re.search(r"100%\|\S+\| \d+/\d+ \[[^\]]*seq/s\]", log)) != disable_tqdm
    assert "ranked by" in log  # the callback's own forecast table
    assert "'loss'" in log  # the trainer's dict logs
    if not disable_tqdm:
        assert "4/4 [" in log  # the Trainer's training bar
    assert "\r" not in log
    assert len(re.findall(r"seq/s\]", log)) == (0 if disable_tqdm else 1)
    for line in ("a transformers warning", "a user warning", "an sts_callback log line", "a stray print",
                 "the story: training", "step 4/4: held-out loss"):
        assert line in log, line
    assert [str(w.message) for w in out.warnings if w.category is UserWarning][-1] == "a user warning"

    # everything put back
    assert sys.stdout is not None and not isinstance(sys.stdout, _LogStream)
    assert [(h, getattr(h, "stream", None)) for h in logging.getLogger("transformers").handlers] == hf_handlers
    print("after")
    assert capfd.readouterr().out == "after\n"


def test_story_of_the_rechecks_in_percent():
    history = [
        {"step": 2, "loss_delta": {"python_code": -0.0126, "legal": 0.0612, "math": None},
         "loss_delta_ci": {"python_code": [-0.0157, -0.0095], "legal": [0.05, 0.0724], "math": [None, None]},
         "sae_fit": {"fvu": 0.351, "l0": 32.0, "tokens": 512}, "overlap_with_forecast": 13,
         "violations": ["protected domain 'legal': held-out loss +6.12% > tolerance 5.00%"]},
        {"step": 4, "error": "RuntimeError: boom"},
        {"step": 6, "loss_delta": {"python_code": -0.0204, "legal": float("nan")}, "sae_fit": None,
         "overlap_with_forecast": None, "accuracy_delta": {"legal": -0.03}, "early_stop": "stopped"},
    ]
    lines = training_story(history, steps=6, protected=["legal"], base_fit={"fvu": 0.349, "l0": 32.0},
                           n_shifted=100)
    text = "\n".join(lines)
    assert "at start: SAE fit on the training probe: FVU 0.349, L0 32.0" in text
    assert ("  step 2/6: held-out loss python_code -1.26±0.31%, legal* +6.12±1.12%, math n/a\n"
            "            SAE fit: FVU 0.351, L0 32.0; 13/100 shifted latents as forecast") in text
    assert "violation: protected domain 'legal'" in text
    assert "step 4/6: the re-check failed: RuntimeError: boom" in text
    assert "step 6/6: held-out loss python_code -2.04%, legal* nan\n            accuracy legal -3.0 pt" in text
    assert "early stop: stopped" in text and "(±: 95% interval; *: protected domain)" in text
    assert recheck_line({"step": 3, "loss_delta": {}}) == "  step 3: no held-out loss"
    assert training_story([]) == ["  no re-check was recorded"]


def fake_forecast():
    def domain(name, icl, fmt):
        return DomainForecast(name=name, texts=10, tokens=100,
                              scores={"sts_icl": icl, "sts_act": 1.0, "forgetting_minus_transfer": fmt})

    domains = {"legal": domain("legal", 2.0e6, 0.4), "code": domain("code", 1.1e7, -0.26),
               "math": domain("math", 5.0e6, None)}
    return Forecast(domains=domains, shifted_latents=list(range(100)), shift_values=[1.0] * 100,
                    shift_direction=[1.0] * 100, raw_shifted_dims=[], raw_shift_values=[], shift_tokens=1500,
                    shift_queries=12, ranking="sts_icl")


def test_forecast_story_ranking_signed_words_and_calibrated_prediction():
    lines = forecast_story(fake_forecast(), protected=["legal"])
    assert [line.split()[1] for line in lines] == ["code", "math", "legal"]
    assert "1.1e+07" in lines[0] and "63% of the shift on latents it uses (mostly transfer)" in lines[0]
    assert "n/a" in lines[1]
    assert "legal (protected)" in lines[2]
    assert "30% of the shift on latents it uses (mostly generic forgetting)" in lines[2]

    predicted = {name: {"mean": m, "low": m - 0.02, "high": m + 0.02, "level": 0.9}
                 for name, m in (("code", -0.031), ("legal", 0.025))}
    lines = forecast_story(fake_forecast(), predicted)
    # the prediction leads, most harmed first; the domain without one comes after with its raw score
    assert [line.split()[1] for line in lines[:3]] == ["legal", "code", "math"]
    assert "held-out loss +2.5% [+0.5%, +4.5%] loss" in lines[0] and "STS_icl" in lines[0]
    assert "held-out loss -3.1% [-5.1%, -1.1%] gain" in lines[1]
    assert "held-out loss" not in lines[2] and "n/a" in lines[2]
    assert "90% interval" in lines[3]
    lines = forecast_story(fake_forecast(), {"code": {**predicted["code"], "high": 0.001}}, top=1)
    assert "flat" in lines[0] and "2 more in the log" in lines[1]


def test_warning_lines_one_line_each():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("first\n  spread over   lines", UserWarning)
        warnings.warn("first\n  spread over   lines", UserWarning)
        warnings.warn("x" * 500, RuntimeWarning)
    lines = warning_lines(caught)
    assert lines[0] == "  UserWarning: first spread over lines (x2)"
    assert lines[1].startswith("  RuntimeWarning: xxx") and len(lines[1]) == 2 + 160
    assert warning_lines([]) == []


def test_log_stream_keeps_last_state_of_redrawn_lines(tmp_path):
    path = tmp_path / "log"
    with open(path, "w") as file:
        stream = _LogStream(file, interval=3600)
        for i in range(1, 101):
            stream.write(f"\rbar {i}/100")
        stream.write("\n")
        stream.write("plain\r\n")
        stream.write("partial")
        stream.finish()
    assert path.read_text() == "bar 100/100\nplain\npartial\n"
    with open(path, "w") as file:
        stream = _LogStream(file, interval=0)  # a snapshot at every redraw
        for i in range(1, 4):
            stream.write(f"\rbar {i}/3")
        stream.write("\n")
    assert path.read_text() == "bar 2/3\nbar 3/3\n"


def test_exception_inside_goes_to_the_log_and_handlers_come_back(tmp_path, capfd):
    log_path = tmp_path / "demo.log"
    late = logging.getLogger("sts_demo_test.configured_inside")  # a library configuring its logging lazily
    with pytest.raises(ValueError), DemoConsole(log_path):
        handler = logging.StreamHandler()  # takes sys.stderr: the log, inside
        late.addHandler(handler)
        raise ValueError("broken")
    console = capfd.readouterr()
    assert f"The demo stopped (ValueError); the full log is in {log_path}" in console.out
    assert "Traceback" in log_path.read_text() and "broken" in log_path.read_text()
    assert handler.stream is sys.stderr  # back to the console, not the closed log
    late.removeHandler(handler)


def test_cli_demo_refuses_a_missing_calibration_before_any_work(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path / "out"), "--calibration", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err
    assert "--calibration" in err and "no such file" in err and "gemma3-270m-lora" in err
    assert len(err.strip().splitlines()) == 1


def test_demo_applies_the_builtin_calibration_to_its_forecast_only(tmp_path, monkeypatch):
    import sts_callback.tools.demo as demo
    from sts_callback import Calibration

    passed = {}
    monkeypatch.setattr(demo, "run_demo", lambda **kwargs: passed.update(kwargs))
    assert main(["demo", "-o", str(tmp_path / "a")]) == 0
    assert passed["calibration"] == "gemma3-270m-lora"  # the default, by name
    assert main(["demo", "-o", str(tmp_path / "b"), "--calibration", "none"]) == 0
    assert passed["calibration"] is None
    monkeypatch.undo()

    seen = {}
    monkeypatch.setattr(demo, "_run", lambda out, output_dir, quick, train_steps, calibration, builtin=False:
                        seen.update(calibration=calibration, builtin=builtin) or {})
    demo.run_demo(output_dir=tmp_path / "c", console=io.StringIO())
    # loaded, and marked built-in: the forecast uses it, the short training run does not (a 64-step recipe's level)
    assert isinstance(seen["calibration"], Calibration) and seen["builtin"] is True
    demo.run_demo(output_dir=tmp_path / "d", calibration=None, console=io.StringIO())
    assert seen["calibration"] is None and seen["builtin"] is False
