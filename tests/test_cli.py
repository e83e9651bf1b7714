"""The `sts` command."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from tiny import domain_texts, make_model, make_tokenizer

from sts_callback.cli import main


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    root = tmp_path_factory.mktemp("cli")
    make_model("llama").save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post")))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    sae.save_model(root / "sae")
    (root / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in domain_texts("law", 30)))
    (root / "chem.jsonl").write_text("\n".join(json.dumps({"prompt": t, "completion": t})
                                                for t in domain_texts("chem", 20)))
    return root


def write_config(root, **changes):
    config = {"model": str(root / "model"), "sae": str(root / "sae"), "train_data": str(root / "train.jsonl"),
              "targets": {"chem": str(root / "chem.jsonl"), "food": domain_texts("food", 20)},
              "options": {"n_shifted": 8, "shift_tokens": 150, "domain_tokens": 80},
              "output": str(root / "out" / "forecast.json")}
    config.update(changes)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_forecast_from_yaml_config(workspace, capsys):
    assert main(["forecast", str(write_config(workspace)), "--no-progress", "--set", "seed=3"]) == 0
    printed = capsys.readouterr().out
    assert "STS forecast: 2 target domains" in printed and "chem" in printed and "food" in printed
    saved = json.loads((workspace / "out" / "forecast.json").read_text())
    assert set(saved["domains"]) == {"chem", "food"}
    assert saved["settings"]["config"]["seed"] == 3 and saved["settings"]["layer"] == 1


def test_bad_config_is_reported_without_traceback(workspace, capsys):
    path = workspace / "broken.yaml"
    path.write_text(yaml.safe_dump({"model": "x"}))
    assert main(["forecast", str(path)]) == 2
    assert "lacks ['sae', 'train_data', 'targets']" in capsys.readouterr().err
    assert main(["forecast", str(write_config(workspace, options={"n_shifted": 0}))]) == 2
    assert "n_shifted must be an integer >= 1" in capsys.readouterr().err


def test_help_and_example_config(capsys):
    assert main(["forecast", "--example"]) == 0
    example = yaml.safe_load(capsys.readouterr().out)
    assert {"model", "sae", "train_data", "targets", "options"} <= set(example)
    out = subprocess.run([sys.executable, "-m", "sts_callback.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "forecast" in out.stdout and "demo" in out.stdout and "train-sae" in out.stdout


def test_domains_listing(capsys):
    assert main(["domains"]) == 0
    listed = capsys.readouterr().out
    assert "python_code" in listed and "legal" in listed


def test_import_does_not_load_sae_lens():
    code = "import sys, sts_callback, sts_callback.callback; print('sae_lens' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_train_sae_command(workspace, capsys):
    out_dir = workspace / "trained_sae"
    assert main(["train-sae", "--model", str(workspace / "model"), "--layer", "1", "--data",
                 str(workspace / "train.jsonl"), str(workspace / "chem.jsonl"), "--d-sae", "64", "-k", "4",
                 "--tokens", "2048", "-o", str(out_dir)]) == 0
    assert '"fvu"' in capsys.readouterr().out
    saved = json.loads((out_dir / "training_report.json").read_text())
    assert saved["layer"] == 1 and saved["d_sae"] == 64 and 0 <= saved["fvu"] < 1
    from sts_callback import load_sae

    assert load_sae(out_dir).layer == 1
