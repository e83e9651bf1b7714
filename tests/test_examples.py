"""The examples in examples/ run as a user runs them (one plain CPU process), on a tiny Gemma 3 and a tiny SAE.

Each example loads Gemma 3 270M and the demo SAE; here both loaders are swapped for tiny ones, and everything
else (argument parsing, the trainer's config, the callback, training, the printed summary, the files written)
is the example's own code. A plain one-process run once crashed at ``SFTConfig`` (a gloo backend asked for a
process group nobody started); these tests would have caught it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def run_example(tmp_path, monkeypatch):
    """Run ``examples/<name>.py`` with ``argv`` in ``tmp_path``; returns its printed output."""
    from tiny import make_model, make_tokenizer

    from sts_callback.tools import demo

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # a plain process, whatever launched pytest
        monkeypatch.delenv(name, raising=False)

    def tiny_gemma():
        tokenizer = make_tokenizer()
        return make_model("gemma3", vocab_size=len(tokenizer), layers=demo.DEMO_LAYER + 1, hidden=16), tokenizer

    def run(name: str, argv: list[str], capsys) -> str:
        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.load_gemma3_270m = tiny_gemma
        # wider than STSConfig.n_shifted (100)
        module.ensure_demo_sae = functools.partial(demo.ensure_demo_sae, d_sae=128, k=4, tokens=600)
        monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
        module.main()
        return capsys.readouterr().out

    return run


def _history(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines()]


def test_sft_trl_example_runs_in_one_plain_process(run_example, capsys, tmp_path):
    out = run_example("sft_trl", ["--steps", "2", "--save-steps", "1", "--output", "run"], capsys)
    folder = tmp_path / "run" / "sts"
    assert "training with STS" in out
    assert [r["step"] for r in _history(folder)] == [1, 2]
    assert "held-out loss change: python_code" in out
    assert (folder / "report.md").exists()


def test_sft_trl_example_with_the_lookahead_calibration(run_example, capsys, tmp_path):
    out = run_example("sft_trl", ["--steps", "2", "--save-steps", "2", "--lookahead", "--output", "run"], capsys)
    assert "run-level term: 1 lookahead step moved the training data's own texts" in out  # the built-in's 1 step
    forecast = json.loads(Path("run/sts/forecast.json").read_text())  # the example runs in tmp_path
    assert all(d["scores"]["icl_loss_change"] is not None for d in forecast["domains"].values())  # what it reads
    predicted = out.split("predicted before training: ")[1].splitlines()[0]
    assert [part.split()[0] for part in predicted.split(", ")] == ["math", "legal", "readme_prose", "nlp_tutorials"]


def test_sft_trl_example_refuses_lookahead_with_a_full_fine_tune(run_example, capsys, tmp_path):
    with pytest.raises(SystemExit):
        run_example("sft_trl", ["--lookahead", "--full", "--local_rank=0"], capsys)  # as the deepspeed launcher
    assert "drop --full" in capsys.readouterr().err  # passes it: it was refused, "unrecognized arguments"
    assert not (tmp_path / "cache").exists()  # refused before the demo SAE was trained (minutes with the real model)


def test_trainer_full_ft_example_runs(run_example, capsys, tmp_path):
    out = run_example("trainer_full_ft", ["--steps", "2", "--save-steps", "1", "--output", "run"], capsys)
    assert "training with STS" in out
    history = _history(tmp_path / "run" / "sts")
    assert [r["step"] for r in history] == [1, 2]
    assert set(history[-1]["loss_delta"]) == {"legal_heldout", "python_code", "math"}


def test_grpo_trl_example_runs(run_example, capsys, tmp_path):
    out = run_example("grpo_trl", ["--steps", "2", "--save-steps", "1", "--output", "run"], capsys)
    assert "GRPO with STS" in out
    history = _history(tmp_path / "run" / "sts")
    assert [r["step"] for r in history] == [1, 2]
    # its reward varies within a prompt's completions, so GRPO has an advantage and the weights move (an
    # all-or-nothing sum reward gave a base model 0 everywhere: nothing trained, every re-check exactly 0)
    assert not any(r.get("model_unchanged") for r in history)
    assert any(r["shift_total"] > 0 for r in history)


def test_gate_mixture_example_writes_its_decision(run_example, capsys, tmp_path):
    out = run_example("gate_mixture", [], capsys)
    from sts_callback.pipelines.gate import GateDecision

    folder = tmp_path / "outputs" / "gate_mixture"
    decision = GateDecision.load(folder / "gate.json")
    assert "wrote outputs/gate_mixture/gate.json" in out
    assert set(decision.candidates) == {"code", "math", "changelog", "legal_extra"}
    assert sorted(p.stem for p in (folder / "filtered").glob("*.jsonl")) == sorted(decision.accepted)
