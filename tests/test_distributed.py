"""Two real processes (torchrun, gloo, CPU): DDP, DeepSpeed ZeRO-2 and ZeRO-3 give the numbers of one
process, only rank 0 writes, uneven probe sets do not hang, and bad inputs fail on every rank."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "distributed_worker.py"
TIMEOUT = 300  # a hang fails the test instead of blocking CI
REL = 1e-5


def run(mode: str, out: Path, processes: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    done = subprocess.run([*launcher, str(WORKER), mode, str(out)], cwd=out.parent, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run("single", tmp_path_factory.mktemp("single") / "out", 1)[0]


@pytest.fixture(scope="module")
def single_own_dtype(tmp_path_factory):
    return run("single_own_dtype", tmp_path_factory.mktemp("single_own_dtype") / "out", 1)[0]


def close(a: float, b: float, what: str) -> None:
    assert abs(a - b) <= REL * max(abs(a), abs(b), 1e-12), f"{what}: {a} vs {b}"


def assert_same_numbers(reference: dict, other: dict) -> None:
    for name, domain in reference["forecast"]["domains"].items():
        for variant, value in domain["scores"].items():
            if value is not None:
                close(value, other["forecast"]["domains"][name]["scores"][variant], f"forecast {name} {variant}")
    assert other["forecast"]["shifted_latents"] == reference["forecast"]["shifted_latents"]
    assert [r["step"] for r in other["history"]] == [r["step"] for r in reference["history"]] == [2, 4]
    for mine, theirs in zip(reference["history"], other["history"]):
        assert theirs["shifted_latents"] == mine["shifted_latents"]
        assert theirs["probe_tokens"] == mine["probe_tokens"]
        close(mine["shift_total"], theirs["shift_total"], "shift_total")
        for name in mine["loss"]:
            close(mine["loss"][name], theirs["loss"][name], f"loss {name}")
            # a relative change already: compared on the scale of the loss itself
            assert abs(mine["loss_delta"][name] - theirs["loss_delta"][name]) <= REL, name
            for variant, value in mine["scores"][name].items():
                close(value, theirs["scores"][name][variant], f"re-check {name} {variant}")
        assert theirs["accuracy"] == mine["accuracy"] and set(mine["accuracy"]) == {"quiz"}  # counts, not estimates
        assert theirs["accuracy_delta_ci"] == mine["accuracy_delta_ci"] and set(mine["accuracy_delta_ci"]) == {"quiz"}


def without_timing(history: list[dict]) -> list[dict]:
    """The records without what each rank times for itself (which domains waited for the budget stays)."""
    return [{**{k: v for k, v in r.items() if k not in ("seconds", "timings", "loss_seconds", "overhead")},
             "skipped": r.get("overhead", {}).get("skipped")} for r in history]


@pytest.mark.parametrize("mode", ["ddp", "zero2", "zero3"])
def test_two_processes_match_one(tmp_path, request, mode):
    if mode.startswith("zero"):
        pytest.importorskip("deepspeed")
    rank0, rank1 = run(mode, tmp_path / "out", 2)
    reference = request.getfixturevalue("single_own_dtype" if mode == "zero3" else "single")
    assert_same_numbers(reference, rank0)
    # the in-context NLL change (a score of its own passes over the domains) is among the numbers compared
    assert all(d["scores"]["icl_loss_change"] is not None for d in reference["forecast"]["domains"].values())
    assert without_timing(rank1["history"]) == without_timing(rank0["history"])  # identical on every rank
    assert rank1["forecast"]["domains"] == rank0["forecast"]["domains"]
    # ZeRO-3 shards parameters: the forward must not be stopped early there
    assert rank0["truncated_forward"] is (mode != "zero3")
    assert rank1["written"] == []
    names = {Path(p).name for p in rank0["written"]}
    assert {"forecast.json", "history.jsonl", "monitor.safetensors", "report.html"} <= names


def test_overhead_budget_choice_is_rank_zeros_on_every_rank(tmp_path):
    rank0, rank1 = run("budget", tmp_path / "out", 2)  # rank 1 alone would measure every domain: a hang
    assert without_timing(rank1["history"]) == without_timing(rank0["history"])
    for record in rank0["history"]:
        assert "food" in record["loss_delta"] and record["overhead"]["skipped"]
        assert not set(record["overhead"]["skipped"]) & set(record["loss_delta"])


@pytest.mark.parametrize("kind", ["dpo", "grpo", "distill"])
def test_preference_rl_and_distillation_forecasts_two_processes_match_one(tmp_path, kind):
    single = run(f"trl_{kind}", tmp_path / "one", 1)[0]
    ranks = run(f"trl_{kind}", tmp_path / "two", 2)
    one, (rank0, rank1) = single["forecast"], (r["forecast"] for r in ranks)
    if kind != "dpo":  # the re-check after the step: the same fresh prompts, the same probe on both ranks (the
        # policy itself differs from one process's: the ranks trained on other completions)
        fresh = [r["history"][-1]["fresh_probe"] for r in (single, *ranks)]
        assert fresh[0]["prompts"] == fresh[1]["prompts"] == fresh[2]["prompts"]
        assert fresh[1] == fresh[2] and fresh[1]["tokens"] > 0
        assert without_timing(ranks[0]["history"]) == without_timing(ranks[1]["history"])
    shifts = {"dpo": "chosen_vs_rejected", "grpo": "reward_weighted", "distill": "teacher_completions"}
    assert one["settings"]["shift"] == shifts[kind]
    assert rank0["shifted_latents"] == rank1["shifted_latents"] == one["shifted_latents"]
    if kind != "dpo":  # the same rollouts, sampled per prompt, whatever the number of processes
        what = "rollouts" if kind == "grpo" else "distillation"
        assert rank0["settings"][what] == one["settings"][what]
    for name, domain in one["domains"].items():
        for variant, value in domain["scores"].items():
            if value is not None:
                # The in-context variants difference two float32 forwards whose batches are grouped per rank (other
                # padding, other BLAS shapes): on some latents that noise is 1e-4 of the score, not 1e-5.
                rel = 1e-3 if variant.endswith("_icl") else REL
                mine, theirs = value, rank0["domains"][name]["scores"][variant]
                assert abs(mine - theirs) <= rel * max(abs(mine), abs(theirs)), f"{kind} {name} {variant}"
                assert rank1["domains"][name]["scores"][variant] == theirs


@pytest.mark.parametrize("mode", ["ddp", "zero3"])
def test_an_exception_on_one_rank_fails_the_recheck_on_every_rank_and_training_goes_on(tmp_path, mode):
    """Rank 1 alone raises (as a CUDA OOM would) in the probe pass of re-check 1, the held-out loss pass of re-check 2
    and the multiple-choice pass of re-check 3: inside a forward under DDP, right after one under ZeRO-3 (where a
    failed rank keeps running its forwards). Both ranks record each failure, naming rank 1 and the original error,
    and train on together; re-check 4 measures. Under DDP with strict=True both ranks raise it."""
    if mode == "zero3":
        pytest.importorskip("deepspeed")
    rank0, rank1 = run("onerank_failure" + ("_zero3" if mode == "zero3" else ""), tmp_path / "out", 2)  # no abort
    assert rank0["fired"] == []
    if mode == "ddp":  # the failed rank skipped the rest of each pass's forwards
        assert rank1["fired"] == [[1, "probe"], [2, "losses"], [3, "accuracy"], [1, "probe"]]
    else:  # it ran them all, failing again after each, as many as rank 0 ran
        assert rank1["fired"].count([1, "probe"]) == rank0["forwards"]["1:probe"] > 1
        assert rank0["forwards"] == rank1["forwards"]
    for result in (rank0, rank1):
        assert result["global_step"] == 8
        history = result["history"]
        assert [r["step"] for r in history] == [2, 4, 6, 8]
        for record, where in zip(history, ("probe", "losses", "accuracy")):
            assert record["error"] == f"RuntimeError: [rank 1] CUDA out of memory (simulated in the {where} pass)"
            trace = record["traceback"]
            if hasattr(BaseException, "add_note"):  # Python 3.11+: rank 1's traceback as a note, in every record
                assert "Raised on rank 1" in trace and ("in hook" in trace or "in wrapper" in trace)
        last = history[-1]
        assert "error" not in last and last["shift_total"] > 0 and last["accuracy"] and "food" in last["loss_delta"]
        if mode == "ddp":
            assert result["strict_error"] == "RuntimeError: [rank 1] CUDA out of memory (simulated in the probe pass)"
            assert result["strict_history"] == []
    assert without_timing(rank1["history"]) == without_timing(rank0["history"])  # identical on every rank


def test_a_reward_function_failing_on_one_rank_under_zero3_raises_on_both_without_hanging(tmp_path):
    pytest.importorskip("deepspeed")
    rank0, rank1 = run("grpo_reward_fails_zero3", tmp_path / "out", 2)
    for result in (rank0, rank1):
        assert result["error"].startswith("STSInputError: [rank 1] Reward function 0 ('reward_law') raised "
                                          "ValueError: reward parser failed on rank 1"), result["error"]


def test_an_exception_on_one_rank_in_the_run_level_term_skips_it_on_every_rank(tmp_path):
    """Rank 1 alone failing inside the run-level term (its training gradient, its held-out pass) left rank 0 waiting
    in the term's sum for ever: now both skip the term and train on; strict=True raises it on both."""
    rank0, rank1 = run("runlevel_onerank_failure", tmp_path / "out", 2)
    assert rank1["fired"] == ["training gradient", "held-out pass"] and rank0["fired"] == []
    for result in (rank0, rank1):
        for name in ("lookahead", "first_order"):
            assert result["runs"][name] == {"run_level": None, "global_step": 2}
        assert result["runs"]["strict"]["error"] == ("RuntimeError: [rank 1] CUDA out of memory (simulated in the "
                                                    "held-out pass)")


def test_bad_inputs_fail_on_every_rank_without_hanging(tmp_path):
    ranks = run("bad_inputs", tmp_path / "out", 2)
    for result in ranks:
        errors = result["errors"]
        assert "disagree" in errors["domains_disagree"] and "target domains" in errors["domains_disagree"]
        assert "['chem', 'food', 'law', 'quiz', 'sport']" in errors["domains_disagree"]
        assert "disagree" in errors["sae_disagree"] and "SAE" in errors["sae_disagree"]
        # the same names on both ranks: the error names the domain whose texts differ, and only that one
        assert "target domain 'food'" in errors["one_domain_differs"]
        assert "target domain 'law'" not in errors["one_domain_differs"]
        assert "has 1 texts but this run has 2 processes" in errors["probe_smaller_than_world"]
        assert "train_probe=" in errors["probe_smaller_than_world"]  # the fix that helps with one text


def test_forecast_refuses_ranks_with_different_data(tmp_path):
    for result in run("forecast_disagree", tmp_path / "out", 2):
        errors = result["errors"]
        assert "disagree" in errors["train_disagrees"] and "training data" in errors["train_disagrees"]
        assert "disagree" in errors["domains_disagree"] and "['chem', 'food', 'law', 'quiz', 'sport']" in errors["domains_disagree"]
        assert errors["agree"] is None


def test_fsdp2_sharded_model_is_captured_in_lockstep_mode():
    """FSDP2 (``fully_shard``) runs on CPU with gloo: the decoder layer is found through it, sharding is
    detected (no truncated forward) and the residual equals the plain model's."""
    import socket

    import torch
    import torch.distributed as dist
    from tiny import make_model
    from torch.distributed.fsdp import fully_shard

    from sts_callback.core.capture import ResidualCapture, parameters_are_sharded

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        ids = torch.tensor([[1, 10, 11, 12, 13]])
        expected = ResidualCapture(make_model("llama"), 1)(ids, torch.ones_like(ids))
        sharded = make_model("llama")
        for layer in sharded.model.layers:
            fully_shard(layer)
        fully_shard(sharded)
        assert parameters_are_sharded(sharded)
        capture = ResidualCapture(sharded, 1)
        assert capture.truncate is False
        with torch.no_grad():
            got = capture(ids, torch.ones_like(ids))
        assert torch.allclose(got, expected, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def callback_runlevel_single(tmp_path_factory):
    return run("callback_runlevel_single", tmp_path_factory.mktemp("cb_runlevel") / "out", 1)[0]["callback_runlevel"]


def test_callback_run_level_under_zero3_falls_back_to_first_order_and_refuses_a_lookahead_calibration(
        tmp_path, callback_runlevel_single):
    """ZeRO-3 shards the weights, so the callback's lookahead falls back to the first-order estimate (the same
    numbers as one process's first order), and a calibration whose level is a lookahead's is refused at train
    start, naming the fix."""
    pytest.importorskip("deepspeed")
    reference = callback_runlevel_single["first_order"]["run_level"]
    for theirs in [r["callback_runlevel"] for r in run("callback_runlevel_zero3", tmp_path / "out", 2)]:
        fallback = theirs["every"]["run_level"]
        assert fallback["method"] == "first_order"
        assert abs(fallback["own_change"] - reference["own_change"]) <= REL
        for domain, value in reference["change"].items():
            assert abs(fallback["change"][domain] - value) <= REL, domain
        assert theirs["own_only"].startswith("STSConfigError") and "ZeRO-3" in theirs["own_only"]
        assert "DDP or ZeRO-2" in theirs["own_only"]


def test_callback_run_level_two_processes_match_one(tmp_path, callback_runlevel_single):
    """STSCallback(run_level="lookahead") under DDP: each domain's lookahead change, the training data's own
    change (also when a calibration needs only that and no domain is measured) and the calibrated forecast equal
    one process's within 1e-5."""
    reference = callback_runlevel_single
    ranks = [r["callback_runlevel"] for r in run("callback_runlevel_ddp", tmp_path / "two", 2)]
    every, own_only = reference["every"]["run_level"], reference["own_only"]["run_level"]
    assert own_only["change"] == {} and set(every["change"]) == {"law", "food", "chem", "sport", "quiz"}
    assert abs(every["own_change"]) > 1e-3  # the steps move the training data's loss
    assert own_only["own_change"] == pytest.approx(every["own_change"], abs=1e-6)
    assert set(reference["own_only"]["predicted"]) == set(every["change"])  # the calibrated forecast, every domain
    for theirs in ranks:
        for name in ("every", "own_only", "first_order"):
            mine = theirs[name]["run_level"]
            assert mine["batches"] == reference[name]["run_level"]["batches"] == "run"  # each rank's own shard
            assert mine["own_tokens"] == reference[name]["run_level"]["own_tokens"]
            assert abs(mine["own_change"] - reference[name]["run_level"]["own_change"]) <= REL
            assert set(mine["change"]) == set(reference[name]["run_level"]["change"])
            for domain, value in reference[name]["run_level"]["change"].items():
                assert abs(mine["change"][domain] - value) <= REL, f"{name} {domain}"
        for domain, value in reference["own_only"]["predicted"].items():
            close(value["mean"], theirs["own_only"]["predicted"][domain]["mean"], f"predicted {domain}")


@pytest.fixture(scope="module")
def runlevel_single(tmp_path_factory):
    return run("runlevel_single", tmp_path_factory.mktemp("runlevel") / "out", 1)[0]["runlevel"]


@pytest.mark.parametrize("mode", ["ddp", "zero2", "zero3"])
def test_runlevel_term_two_processes_match_one(tmp_path, runlevel_single, mode):
    """Lookahead and first-order estimates from a Trainer callback at on_train_begin (the Trainer's own optimizer)
    equal one process's within 1e-5; ZeRO-3 refuses the lookahead with a pointer to first_order, which runs."""
    if mode.startswith("zero"):
        pytest.importorskip("deepspeed")
    ranks = [r["runlevel"] for r in run(f"runlevel_{mode}", tmp_path / "out", 2)]
    for method in ("lookahead", "first_order"):
        reference = runlevel_single[method]
        assert isinstance(reference, dict), reference
        assert max(abs(v) for v in reference["change"].values()) > 1e-3  # the steps move the losses
        for theirs in ranks:
            if mode == "zero3" and method == "lookahead":
                assert theirs[method].startswith("STSConfigError") and "first_order" in theirs[method]
                continue
            assert isinstance(theirs[method], dict), theirs[method]
            assert theirs[method]["train_tokens"] == reference["train_tokens"]
            for name, value in reference["change"].items():
                # relative changes already: compared on the scale of the loss itself
                assert abs(theirs[method]["change"][name] - value) <= REL, f"{method} {name}"
                close(reference["loss_before"][name], theirs[method]["loss_before"][name], f"{method} loss {name}")
    assert all(r["restored"] for r in [runlevel_single, *ranks])


def test_the_runs_first_batches_read_on_two_processes_are_each_ranks_own_and_one_processes_global_ones(tmp_path):
    """Each rank reads the micro-batches it then trains on; every rank's, read on either, are the global batches in
    order: the texts one process with the whole batch trains on (into the second epoch)."""
    one = run("first_batches_single", tmp_path / "one", 1)[0]["first_batches"]
    ranks = [r["first_batches"] for r in run("first_batches_ddp", tmp_path / "two", 2)]
    assert one["mine"] == one["every"] == one["trained"][:4]
    assert len({text for batch in one["mine"][:3] for text in batch}) == 12  # the first epoch: 12 distinct texts
    for rank in ranks:
        assert rank["mine"] == rank["trained"][:4]
        assert [t for batch in rank["every"] for t in batch] == [t for batch in one["mine"] for t in batch]
    for step in range(4):  # each global batch split between the ranks
        assert ranks[0]["mine"][step] + ranks[1]["mine"][step] == one["mine"][step]
