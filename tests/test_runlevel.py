"""The run-level term (issue 13, items 2 and 5): lookahead restores everything bit-exactly and measures what an
independent re-implementation measures; the first-order estimate matches the finite-difference change."""

import copy
import random

import numpy as np
import pytest
import torch
from tiny import domain_texts, make_model, make_tokenizer

from sts_callback.pipelines import runlevel
from sts_callback.core.errors import STSConfigError, STSInputError
from sts_callback.pipelines.monitor import nll_sums
from sts_callback.pipelines.runlevel import (RunLevelConfig, _Optimizer, _update, first_order, lookahead,
                                             measure_losses, training_batches)

DOMAINS = ("law", "code", "chem", "sport", "food")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def targets(tokenizer):
    out = {}
    for domain in DOMAINS:
        sequences = []
        for text in domain_texts(domain, 6, seed=1):
            ids = list(tokenizer(text)["input_ids"])
            sequences.append((ids, [False] + [True] * (len(ids) - 2)))  # BOS and the first word not counted
        out[domain] = sequences
    return out


def collate(items):
    longest = max(len(item["input_ids"]) for item in items)
    ids = torch.zeros(len(items), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        ids[row, :n] = torch.tensor(item["input_ids"])
        mask[row, :n] = 1
        labels[row, 1:n] = ids[row, 1:n]  # the BOS label is never trained on anyway
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(scope="module")
def dataset(tokenizer):
    return [{"input_ids": list(tokenizer(t)["input_ids"])} for t in domain_texts("law", 24) + domain_texts("code", 8)]


@pytest.fixture(scope="module")
def batches(dataset):
    return training_batches(dataset, collate, 4, 6, seed=0)


def lora_model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(make_model("llama"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                           target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():  # adapters away from their B = 0 init, so that both A and B get gradients
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def adamw(model, lr=1e-2):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and "norm" in n]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8)


def snapshot(model, optimizer):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "state": {id(p): {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in s.items()}
                  for p, s in optimizer.state.items()},
        "groups": [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
        "group_params": [[id(p) for p in g["params"]] for g in optimizer.param_groups],
        "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), "numpy_rng": np.random.get_state(),
        "training": {n: m.training for n, m in model.named_modules()},
    }


def assert_restored(before, model, optimizer):
    after = snapshot(model, optimizer)
    assert before["params"].keys() == after["params"].keys()
    for name, value in before["params"].items():
        assert torch.equal(value, after["params"][name]), name
    for name, value in before["grads"].items():
        assert (value is None) == (after["grads"][name] is None), name
        assert value is None or torch.equal(value, after["grads"][name]), name
    assert after["requires_grad"] == before["requires_grad"]
    for name, value in before["buffers"].items():
        assert torch.equal(value, after["buffers"][name]), name
    assert after["state"].keys() == before["state"].keys()  # empty before -> empty after
    for key, state in before["state"].items():
        assert state.keys() == after["state"][key].keys()
        for k, v in state.items():
            if torch.is_tensor(v):
                assert torch.equal(v, after["state"][key][k]) and v.dtype == after["state"][key][k].dtype, k
            else:
                assert v == after["state"][key][k], k
    assert after["groups"] == before["groups"] and after["group_params"] == before["group_params"]
    assert torch.equal(after["torch_rng"], before["torch_rng"])
    assert after["python_rng"] == before["python_rng"]
    for a, b in zip(after["numpy_rng"], before["numpy_rng"]):
        assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
    assert after["training"] == before["training"]
    return after


def train_one_step(model, optimizer, batch):
    model.train()
    model(**batch, use_cache=False).loss.backward()
    optimizer.step()
    # an optimizer left with gradients and a current lr below its base rate, as mid-warm-up
    for g in optimizer.param_groups:
        g["lr"] = g["lr"] * 0.5
    model.eval()


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_lookahead_restores_parameters_optimizer_state_and_rng_exactly(kind, batches, targets):
    model = make_model("llama") if kind == "full" else lora_model()
    optimizer = adamw(model)
    for g in optimizer.param_groups:
        g["initial_lr"] = g["lr"]  # what a scheduler sets: the peak rate used by the lookahead
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    before = snapshot(model, optimizer)
    assert before["state"] == {}
    result = lookahead(model, optimizer, batches, targets, RunLevelConfig(steps=2, max_grad_norm=1.0))
    assert all(v != 0 for v in result.change.values()) and result.steps == 2
    assert set(result.learning_rates) == {1e-2}
    assert_restored(before, model, optimizer)
    assert optimizer.state == {}  # an optimizer with empty state before is empty after

    # mid-training: state with step counts, gradients left on the parameters, a lowered current lr
    train_one_step(model, optimizer, batches[0])
    before = snapshot(model, optimizer)
    assert before["state"] and all("step" in s for s in before["state"].values())
    lookahead(model, optimizer, batches, targets, {"steps": 3, "accumulation": 2})
    after = assert_restored(before, model, optimizer)
    # the RNG state drawn from afterwards is the same: the next random numbers too
    assert torch.equal(torch.rand(4), (torch.set_rng_state(after["torch_rng"]), torch.rand(4))[1])
    if kind == "lora":
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)


def test_lookahead_with_a_factory_leaves_no_optimizer(batches, targets):
    model = lora_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    made = []

    def factory(params):
        made.append(torch.optim.SGD(params, lr=0.05))
        return made[-1]

    result = lookahead(model, factory, batches, targets, RunLevelConfig(steps=1))
    assert len(made) == 1 and result.learning_rates == [0.05]
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def independent_lookahead(model, make_optimizer, batches, targets, steps, pad=0):
    """A copy of the model trained ``steps`` real steps with the HF loss, measured with monitor.nll_sums."""
    def losses(m):
        out = {}
        m.eval()
        with torch.no_grad():
            for name, sequences in targets.items():
                total, count = nll_sums(m, sequences, pad, 4)
                out[name] = total / count
        return out

    before = losses(model)
    work = copy.deepcopy(model)
    optimizer = make_optimizer(work)
    work.train()
    for step in range(steps):
        optimizer.zero_grad()
        work(**batches[step], use_cache=False).loss.backward()
        optimizer.step()
    after = losses(work)
    return {d: (after[d] - before[d]) / before[d] for d in targets}


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_lookahead_measures_what_an_independent_copy_measures(kind, batches, targets):
    model = make_model("llama") if kind == "full" else lora_model()
    expected = independent_lookahead(model, adamw, batches, targets, steps=3)
    got = lookahead(model, adamw(model), batches, targets, RunLevelConfig(steps=3))
    for domain in targets:
        assert got.change[domain] == pytest.approx(expected[domain], rel=1e-4, abs=1e-7), domain
    assert max(abs(v) for v in got.change.values()) > 1e-3  # the steps moved the losses


def test_lookahead_uses_the_schedule_peak_not_the_current_warm_up_rate(batches, targets):
    model = make_model("llama")
    optimizer = adamw(model, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 10))  # warm-up: lr 0 now
    assert optimizer.param_groups[0]["lr"] == 0.0
    got = lookahead(model, optimizer, batches, targets, RunLevelConfig(steps=2))
    expected = independent_lookahead(model, adamw, batches, targets, steps=2)
    for domain in targets:
        assert got.change[domain] == pytest.approx(expected[domain], rel=1e-4, abs=1e-7), domain
    assert optimizer.param_groups[0]["lr"] == 0.0 and scheduler.last_epoch == 0
    # lr= overrides the peak
    overridden = lookahead(model, optimizer, batches, targets, RunLevelConfig(steps=1, lr=1e-3))
    assert overridden.learning_rates == [1e-3, 1e-3]


def test_a_compressed_run_is_a_lookahead_holding_the_schedules_area(batches, targets):
    """Its steps at the schedule's peak times the factor that puts the whole schedule's learning-rate area into
    them: the change an independent copy measures at that rate, the model put back, the method named."""
    from sts_callback.pipelines.runlevel import compressed_lr_factor, estimate_run_level

    rates = [0.5e-2, 1e-2, 1e-2, 0.75e-2, 0.5e-2, 0.25e-2]  # warm-up and decay: area 4e-2, peak 1e-2
    assert compressed_lr_factor(rates, 2) == pytest.approx(2.0)
    assert compressed_lr_factor([3e-4] * 8, 2) == pytest.approx(4.0)  # constant: the steps' share, inverted
    with pytest.raises(STSConfigError, match="run_level='lookahead' for a run at a rate of 0"):
        compressed_lr_factor([0.0] * 4, 2)
    model = make_model("llama")
    optimizer = adamw(model, lr=1e-2)
    before = snapshot(model, optimizer)
    got = estimate_run_level(model, optimizer, batches, targets, RunLevelConfig(steps=2, lr_factor=2.0),
                             method="compressed")
    assert_restored(before, model, optimizer)
    assert got.method == "compressed" and got.learning_rates == pytest.approx([2e-2, 2e-2])
    expected = independent_lookahead(model, lambda m: adamw(m, lr=2e-2), batches, targets, steps=2)
    for domain in targets:
        assert got.change[domain] == pytest.approx(expected[domain], rel=1e-4, abs=1e-7), domain
    next(iter(model.parameters())).ds_id = 0  # ZeRO-3: no first-order stand-in (not what its calibration reads)
    with pytest.raises(STSConfigError, match="compressed.*ZeRO-3.*run_level='first_order'"):
        estimate_run_level(model, optimizer, batches, targets, RunLevelConfig(steps=2, lr_factor=2.0),
                           method="compressed")


@pytest.mark.parametrize("steps", [1, 3])
def test_first_order_matches_the_finite_difference_change_under_small_lr_sgd(steps, dataset, targets):
    model = make_model("llama")
    lr = 2e-3
    same = training_batches(dataset, collate, 8, 1, seed=3) * steps  # one gradient held for every step
    settings = RunLevelConfig(steps=steps)
    measured = lookahead(model, torch.optim.SGD(model.parameters(), lr=lr), same, targets, settings)
    predicted = first_order(model, torch.optim.SGD(model.parameters(), lr=lr), same, targets, settings)
    big = [d for d in targets if abs(measured.change[d]) > 1e-4]
    assert len(big) >= 4, measured.change
    for domain in big:
        assert predicted.change[domain] == pytest.approx(measured.change[domain], rel=0.05), domain
    for domain in targets:  # the same held-out losses (first_order computes them in its gradient pass)
        assert predicted.loss_before[domain] == pytest.approx(measured.loss_before[domain], rel=1e-6)
        assert predicted.loss_change[domain] == pytest.approx(predicted.change[domain] * predicted.loss_before[domain])


def test_first_order_update_is_adam_preconditioned_like_less(monkeypatch):
    """At step 1 of Adam with bias correction the update is -lr * g / (|g| + eps); with the same gradient held
    for k steps it is k times that (no weight decay)."""
    model = make_model("llama")
    params = [p for p in model.parameters()][:4]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    grads[0][0, 0] = 0.0
    optimizer = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    resolved = _Optimizer(torch.optim.Adam, [(params, dict(optimizer.param_groups[0]))], optimizer, optimizer.state)
    for k in (1, 3):
        deltas = _update(resolved, params, grads, [1e-3], k)
        for g, delta in zip(grads, deltas):
            assert torch.allclose(delta, -k * 1e-3 * g / (g.abs() + 1e-8), rtol=1e-5, atol=1e-12)
    # mid-run state is continued, and a large parameter simulated in slices gives the same delta
    for p, g in zip(params, grads):
        p.grad = g * 3
    optimizer.step()
    whole = _update(resolved, params, grads, [1e-3], 3)
    copies, stepped = copy.deepcopy((params, optimizer))  # the real optimizer continued 3 steps
    for _ in range(3):
        for p, g in zip(copies, grads):
            p.grad = g.clone()
        stepped.step()
    for p, q, delta in zip(params, copies, whole):
        assert torch.allclose(delta, (q - p).detach(), rtol=1e-3, atol=1e-9)
    monkeypatch.setattr(runlevel, "SLICE", 100)
    for a, b in zip(whole, _update(resolved, params, grads, [1e-3], 3)):
        assert torch.equal(a, b)
    sgd = _Optimizer(torch.optim.SGD, [(params, {"lr": 0.1})], None, {})
    for g, delta in zip(grads, _update(sgd, params, grads, [0.1], 2)):
        assert torch.allclose(delta, -2 * 0.1 * g, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_first_order_changes_nothing(kind, batches, targets):
    model = make_model("llama") if kind == "full" else lora_model()
    optimizer = adamw(model)
    train_one_step(model, optimizer, batches[0])
    before = snapshot(model, optimizer)
    result = first_order(model, optimizer, batches, targets, RunLevelConfig(steps=3, max_grad_norm=1.0))
    assert_restored(before, model, optimizer)
    assert result.method == "first_order" and set(result.change) == set(targets)
    assert all(np.isfinite(v) and v != 0 for v in result.change.values())
    assert result.seconds > 0 and set(result.timings) == {"train_gradient", "update", "domains"}


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_gradient_checkpointing_of_either_kind_gives_the_same_run_level_terms(kind, batches, targets):
    """Reentrant checkpointing (use_reentrant=True, TRL's choice under PEFT + ZeRO-3) gave torch.autograd.grad no
    gradient inside its blocks: a LoRA run's terms read 0 (no warning), a full fine-tune's failed."""
    def estimates(checkpointing):
        model = make_model("llama") if kind == "full" else lora_model()
        if checkpointing is not None:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": checkpointing})
            if kind == "lora":
                model.enable_input_require_grads()  # as the Trainer does for PEFT under reentrant checkpointing
        config = RunLevelConfig(steps=2)
        looked = lookahead(model, adamw(model), batches, targets, config).change
        return looked, first_order(model, adamw(model), batches, targets, config).change

    plain = estimates(None)
    assert all(v != 0 for changes in plain for v in changes.values())
    for reentrant in (True, False):
        for got, expected in zip(estimates(reentrant), plain):
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_reentrant_checkpointing_on_sharded_weights_is_an_error_not_a_zero_term(batches, targets, monkeypatch):
    """Under ZeRO-3 / FSDP the blocks stay reentrant (a non-reentrant recomputation meets re-partitioned weights,
    as TRL warns): a gradient that reaches no parameter is named, never read as no change."""
    from sts_callback import STSUsageError
    from sts_callback.pipelines import runlevel

    monkeypatch.setattr(runlevel, "parameters_are_sharded", lambda model: True)
    model = lora_model()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    with pytest.raises(STSUsageError, match="reached none of the trainable parameters.*use_reentrant=True under"):
        runlevel._mean_gradient(model, [p for p in model.parameters() if p.requires_grad], batches[:1], None)


def test_first_order_with_lora_adam_points_the_way_the_lookahead_moves(batches, targets):
    model = lora_model()
    measured = lookahead(model, adamw(model, lr=1e-3), batches, targets, RunLevelConfig(steps=1))
    predicted = first_order(model, adamw(model, lr=1e-3), batches[:1], targets, RunLevelConfig(steps=1))
    for domain in targets:
        assert np.sign(predicted.change[domain]) == np.sign(measured.change[domain]), domain
        assert predicted.change[domain] == pytest.approx(measured.change[domain], rel=0.25), domain


def test_measure_losses_equals_nll_sums(targets):
    model = make_model("llama")
    got = measure_losses(model, targets)
    with torch.no_grad():
        for name, sequences in targets.items():
            total, count = nll_sums(model, sequences, 0, 4)
            assert got[name] == pytest.approx(total / count, rel=1e-12)


def test_training_batches_split_the_same_examples_over_processes(dataset):
    one = training_batches(dataset, lambda items: items, 4, 3, seed=7)
    two = [training_batches(dataset, lambda items: items, 2, 3, seed=7, rank_=r, world=2) for r in range(2)]
    for b in range(3):
        assert sorted(map(str, one[b])) == sorted(map(str, two[0][b] + two[1][b]))
    assert training_batches(dataset, lambda items: items, 4, 3, seed=7) == one  # deterministic, no global RNG
    many = training_batches(dataset, lambda items: items, 8, 10)  # more than one pass over 32 examples
    assert len(many) == 10 and all(len(b) == 8 for b in many)


def test_sharded_parameters_refuse_lookahead_and_point_to_first_order(batches, targets):
    model = make_model("llama")
    optimizer = adamw(model)
    next(iter(model.parameters())).ds_id = 0  # what DeepSpeed ZeRO-3 puts on its partitioned parameters
    with pytest.raises(STSConfigError, match="first_order"):
        lookahead(model, optimizer, batches, targets, RunLevelConfig(steps=1))


def test_bad_inputs_are_named(batches, targets):
    model = make_model("llama")
    with pytest.raises(STSConfigError, match="optimizer"):
        lookahead(model, None, batches, targets)
    with pytest.raises(STSConfigError, match="RunLevelConfig.steps=0"):
        first_order(model, adamw(model), batches, targets, {"steps": 0})
    with pytest.raises(STSInputError, match="training batches"):
        lookahead(model, adamw(model), iter(batches[:1]), targets, RunLevelConfig(steps=2))
    with pytest.raises(STSInputError, match="no held-out"):
        first_order(model, adamw(model), batches, {"law": []})
    frozen = make_model("llama")
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(STSInputError, match="no trainable"):
        first_order(frozen, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), batches, targets)
    beyond = {**targets, "added": [([1, 5, 200, 6], [True] * 3)]}  # an id the 128-row embedding lacks
    for estimate in (lookahead, first_order):  # named on every process before any pass (a bare IndexError, or a
        with pytest.raises(STSInputError, match="resize_token_embeddings"):  # hang where one rank held it)
            estimate(model, adamw(model), batches, beyond)


@pytest.mark.parametrize("values, words", [
    ({"steps": 0}, "RunLevelConfig.steps=0 must be a positive integer"),
    ({"accumulation": True}, "RunLevelConfig.accumulation=True"),
    ({"batch_size": 1.5}, "RunLevelConfig.batch_size=1.5"),
    ({"lr": 0}, "RunLevelConfig.lr=0 must be a positive number, or None"),
    ({"lr": float("inf")}, "RunLevelConfig.lr=inf"),
    ({"max_grad_norm": -1.0}, "RunLevelConfig.max_grad_norm=-1.0 must be a non-negative number"),
    ({"pad": -1}, "RunLevelConfig.pad=-1 must be a token id"),
    ({"lr_factor": 0}, "RunLevelConfig.lr_factor=0 must be a positive number"),
    ({"lr_factor": float("nan")}, "RunLevelConfig.lr_factor=nan"),
    ({"stpes": 2}, "Unknown run-level setting(s) ['stpes']"),
])
def test_run_level_settings_are_checked_when_built(values, words):
    import re

    with pytest.raises(STSConfigError, match=re.escape(words)):
        RunLevelConfig.from_dict(values)


def test_run_level_config_defaults_and_round_trip():
    assert RunLevelConfig() == RunLevelConfig.from_dict(None)
    config = RunLevelConfig(steps=2, accumulation=4, lr=1, max_grad_norm=0, pad=np.int64(3), batch_size=2)
    assert (config.lr, config.max_grad_norm, config.pad) == (1.0, 0.0, 3) and type(config.pad) is int
    assert RunLevelConfig.from_dict(config.to_dict()) == config


def test_not_trained_on_keeps_only_the_texts_the_steps_do_not_see(tokenizer, dataset, batches):
    """A probe text the lookahead's batches train on is left out of the own change, also when the probe holds it
    cut short or without its BOS; texts outside the batches stay."""
    trained = {tuple(row[m.bool()].tolist()) for b in batches for row, m in zip(b["input_ids"], b["attention_mask"])}
    in_batches = [item["input_ids"] for item in dataset if tuple(item["input_ids"]) in trained]
    outside = [item["input_ids"] for item in dataset if tuple(item["input_ids"]) not in trained]
    assert in_batches and outside
    probe = ([(ids, [True] * (len(ids) - 1)) for ids in outside]
             + [(ids[1:], [True] * (len(ids) - 2)) for ids in in_batches]  # no BOS
             + [(ids[: len(ids) * 2 // 3], [True] * (len(ids) * 2 // 3 - 1)) for ids in in_batches])  # cut
    kept = runlevel.not_trained_on(probe, batches)
    assert [ids for ids, _ in kept] == outside


def test_the_trainer_run_level_measures_the_own_change_on_texts_the_steps_do_not_train_on(tmp_path, tokenizer):
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from sts_callback.integrations.trainer_run_level import run_level_runner

    texts = domain_texts("law", 40, seed=11)
    data = Dataset.from_dict({"text": texts}).map(lambda b: tokenizer(b["text"]), batched=True,
                                                  remove_columns=["text"])
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2,
                             max_steps=2, use_cpu=True, report_to=[], seed=0)
    trainer = Trainer(model=make_model("llama"), args=args, train_dataset=data,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    probe = [(list(tokenizer(t)["input_ids"]), [True] * (len(tokenizer(t)["input_ids"]) - 1)) for t in texts[:20]]
    run = run_level_runner("lookahead", trainer, args, {}, tokenizer, 2, own=probe, domains=False)
    estimate = run(trainer.model, {})
    steps = training_batches(data, trainer.data_collator, 4, 2, seed=0)
    seen = {tokenizer.decode(row[m.bool()]) for b in steps for row, m in zip(b["input_ids"], b["attention_mask"])}
    unseen = [seq for seq, text in zip(probe, texts[:20]) if tokenizer.decode(seq[0]) not in seen]
    assert 0 < len(unseen) < len(probe)  # some of the probe was in the steps' batches
    assert estimate.own_tokens == sum(sum(flags) for _, flags in unseen)


def sft_trainer(tmp_path, tokenizer, data, **options):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=2,
                     use_cpu=True, report_to=[], seed=0, **{"max_length": None, **options})
    trainer = SFTTrainer(model=make_model("llama"), args=args, train_dataset=data, processing_class=tokenizer)
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    return trainer


def test_padding_free_and_packed_batches_are_stepped_as_the_trainer_trains_them(tmp_path, tokenizer, targets):
    """A padding-free or packed batch holds several examples in one row, kept apart by its position_ids (and
    sequence boundaries): the run-level term gave the model only input_ids and a mask, so the examples attended
    to each other (first-order change 20-30% off on a tiny model)."""
    from datasets import Dataset

    from sts_callback.integrations.trainer_run_level import run_level_runner

    data = Dataset.from_dict({"text": domain_texts("law", 40, seed=5)})
    changes = {}
    for layout, options in {"padded": {}, "padding_free": {"padding_free": True}}.items():
        trainer = sft_trainer(tmp_path / layout, tokenizer, data, **options)
        run = run_level_runner("first_order", trainer, trainer.args, targets, tokenizer, 2)
        changes[layout] = run(trainer.model, measure_losses(trainer.model, targets)).change
    assert changes["padding_free"] == pytest.approx(changes["padded"], rel=1e-4)
    trainer = sft_trainer(tmp_path / "packed", tokenizer, data, packing=True, max_length=64)
    batch = training_batches(trainer.train_dataset, trainer.data_collator, 4, 1, seed=0)[0]
    assert "position_ids" in batch and "attention_mask" not in batch
    nll, count = runlevel._train_nll(trainer.model, batch, torch.device("cpu"))
    with torch.no_grad():
        assert float(nll) / count == pytest.approx(float(trainer.model(**batch).loss), rel=1e-5)


def test_a_streamed_train_set_and_a_raw_text_column_are_read_as_the_trainer_loads_them(tmp_path, tokenizer, targets):
    """A streaming train set (no len()) failed with a bare TypeError at train start; a plain Trainer's dataset that
    keeps its text column beside the ids failed in the collator (the Trainer drops unused columns first)."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from sts_callback.integrations.trainer_run_level import run_level_runner

    texts = domain_texts("law", 40, seed=11)
    data = Dataset.from_dict({"text": texts}).map(lambda b: tokenizer(b["text"]), batched=True)  # text kept
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2,
                             max_steps=2, use_cpu=True, report_to=[], seed=0)
    changes = {}
    for kind, train in {"map": data, "stream": data.to_iterable_dataset()}.items():
        trainer = Trainer(model=make_model("llama"), args=args, train_dataset=train,
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
        trainer.create_optimizer_and_scheduler(num_training_steps=2)
        run = run_level_runner("lookahead", trainer, args, targets, tokenizer, 2)
        changes[kind] = run(trainer.model, measure_losses(trainer.model, targets)).change
        assert all(np.isfinite(v) and v < 0 for v in changes[kind].values())  # trained on law at lr 1e-2
    assert changes["map"]["law"] < changes["map"]["sport"]


def test_the_runs_first_batches_are_read_only_where_the_order_is_known_beforehand():
    """Accelerate's seedable sampler (the Trainer's): its first batches, into the next epoch, and the loader then
    gives those same batches (nothing of its state moved). An order drawn from torch's global generator, or from
    a generator the loader draws its workers' seed from first, or a stream: unknown (``None``), and the caller
    draws its own."""
    import torch
    from accelerate.data_loader import SeedableRandomSampler
    from torch.utils.data import DataLoader, IterableDataset

    from sts_callback.integrations.first_batches import run_first_batches

    data = [{"input_ids": torch.tensor([i, i + 1])} for i in range(10)]
    stack = lambda rows: {"input_ids": torch.stack([r["input_ids"] for r in rows])}  # noqa: E731
    seedable = DataLoader(data, batch_size=3, collate_fn=stack, sampler=SeedableRandomSampler(data, data_seed=7))
    mine, every = run_first_batches(seedable, 5)  # 4 batches an epoch: the fifth is the next epoch's first
    assert len(mine) == 5 and all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(mine, every))
    loaded = [b["input_ids"] for b in seedable] + [b["input_ids"] for b in seedable]
    assert all(torch.equal(a["input_ids"], b) for a, b in zip(mine, loaded))
    assert not all(torch.equal(a, b) for a, b in zip(loaded[:3], loaded[4:7]))  # the next epoch: another order
    assert run_first_batches(DataLoader(data, batch_size=3, shuffle=True, collate_fn=stack), 2) is None
    assert run_first_batches(DataLoader(data, batch_size=3, shuffle=True, collate_fn=stack,
                                        generator=torch.Generator().manual_seed(7)), 2) is None

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(data)

    assert run_first_batches(DataLoader(Stream(), batch_size=3, collate_fn=stack), 2) is None
