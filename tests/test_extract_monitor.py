"""The extraction iterators read the residual stream at the right tokens; a re-check of unchanged weights
measures no change; the monitor's state round-trips."""

import pytest
import torch
from tiny import TinySAE, domain_texts, make_model, make_tokenizer

from sts_callback.core.config import STSConfig
from sts_callback.core.data import Example, load_corpus
from sts_callback.pipelines.forecast import ForecastSetup
from sts_callback.pipelines.monitor import Monitor
from sts_callback.pipelines.recheck import Recheck

LAYER = 1


@pytest.fixture(scope="module")
def setup():
    tokenizer, model = make_tokenizer(), make_model("llama")
    return ForecastSetup.create(model, tokenizer, TinySAE(32, 64, hook_name=f"blocks.{LAYER}.hook_resid_post"),
                        STSConfig(n_shifted=8, batch_size=3))


def test_iter_rows_are_the_hidden_states_at_counted_tokens(setup):
    sequences = [setup.builder.single(Example(prompt=t, plain_text=True)) for t in domain_texts("law", 7)]
    extractor = setup.extractor()
    seen = {}
    with torch.no_grad():
        for item in extractor.iter_rows(sequences):
            for row_in_batch, index in enumerate(item.batch):
                seen[index] = item.rows[item.where[0] == row_in_batch]
        for index, (ids, counted) in enumerate(sequences):
            hidden = setup.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[LAYER + 1][0]
            expected = hidden[-len(counted):][torch.tensor(counted)]
            torch.testing.assert_close(seen[index], expected, rtol=1e-4, atol=1e-5)


def test_across_processes_each_sequence_runs_in_its_one_process_batch(setup, monkeypatch):
    """Split across processes, each rank ran every W-th text in batches of its own (other neighbours, other
    padding): the last float bits differed from one process, and on a real model a latent at the edge of the top
    shifted ones changed places (0.75% on STS_icl under ZeRO-2). Each rank now runs whole batches of one process's
    batching, so every sequence's residual rows are one process's to the bit."""
    import sts_callback.core.distributed as distributed
    import sts_callback.core.extract as extract

    sequences = [setup.builder.single(Example(prompt=t, plain_text=True)) for t in domain_texts("law", 8)]
    extractor = setup.extractor()
    with torch.no_grad():
        alone = {index: item.rows[item.where[0] == row] for item in extractor.iter_rows(sequences)
                 for row, index in enumerate(item.batch)}
    monkeypatch.setattr(extract, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    counted = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        part, sizes = extractor.share_batches([len(ids) for ids, _ in sequences])
        local = [sequences[i] for i in part.indices]
        with torch.no_grad():
            for item in extractor.iter_rows(local, batch_sizes=sizes):
                for row, i in enumerate(item.batch):
                    if part.counted[i]:
                        counted.append(part.indices[i])
                        assert torch.equal(item.rows[item.where[0] == row], alone[part.indices[i]])
    assert sorted(counted) == list(range(len(sequences)))  # each text once, over the two ranks


def test_iter_paired_rows_compare_the_same_query_tokens(setup):
    texts = domain_texts("food", 6)
    demos = [Example(prompt=t, answer="cook") for t in texts[3:]]
    pairs = [setup.builder.pair(Example(prompt=t, plain_text=True), demos) for t in texts[:3]]
    with torch.no_grad():
        items = list(setup.extractor().iter_paired_rows(pairs))
    assert sum(len(i.batch) for i in items) == 3
    for item in items:
        assert item.rows.shape == item.context_rows.shape
        assert not torch.allclose(item.rows, item.context_rows)  # the demonstrations change the query's residuals


def monitor_for(setup, loss_head_dtype=None, loss_body_dtype=None, loss_head_samples=None):
    domains = {d: load_corpus(domain_texts(d, 12), name=d) for d in ("law", "chem")}
    loss_sets = {n: Monitor.sample_sequences(c, setup, 80, seed=f"0:{n}")[0] for n, c in domains.items()}
    probe, _ = Monitor.sample_sequences(load_corpus(domain_texts("law", 12, seed=2)), setup, 60, seed="probe")
    from sts_callback.pipelines.forecast import domain_statistics
    from sts_callback.pipelines.monitor import domain_baselines_from

    monitor = Monitor(setup=setup, probe=probe, domains=domain_baselines_from(domain_statistics(setup, domains)),
                      loss_sets=loss_sets, loss_head_dtype=loss_head_dtype, loss_body_dtype=loss_body_dtype,
                      loss_head_samples=loss_head_samples)
    monitor.capture_base(setup.model)
    monitor.base_losses = monitor.measure_losses(setup.model)
    return monitor


def test_recheck_of_unchanged_weights_measures_no_change(setup):
    record = monitor_for(setup).recheck(setup.model, forecast_latents=[0, 1])
    assert record.shift_total == 0.0
    assert all(abs(d) < 1e-6 for d in record.loss_delta.values())  # other batches than the base: float noise
    assert set(record.loss_delta_ci) == {"law", "chem"}
    assert Recheck.from_dict({"step": 3, **record.to_dict()}) == record  # a history line reads back


def test_unchanged_weights_under_the_trainers_autocast_show_no_shift(setup):
    """A bf16 / fp16 run re-checks its residuals under the trainer's autocast: the train-start residuals are
    captured under it too, or the float32 / bf16 difference read as a shift before any step."""
    import functools

    bf16 = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    monitor = monitor_for(setup)
    monitor.capture_base(setup.model, bf16)
    record = monitor.recheck(setup.model, forecast_latents=[0, 1], autocast=bf16)
    assert record.shift_total == 0.0
    monitor.capture_base(setup.model)  # as before: captured without it
    assert monitor.recheck(setup.model, forecast_latents=[0, 1], autocast=bf16).shift_total > 0


def test_monitor_state_round_trips(setup, tmp_path):
    monitor = monitor_for(setup)
    path = monitor.save(tmp_path / "monitor.safetensors")
    again = monitor_for(setup)
    again.base_residuals, again.base_sequence_nll, again.probe = None, {}, []
    again.load(path)
    assert torch.equal(again.base_residuals, monitor.base_residuals)
    assert again.probe == monitor.probe  # the very sequences the base residuals belong to
    for name, sums in monitor.base_sequence_nll.items():
        assert torch.equal(again.base_sequence_nll[name], sums)


def test_domain_names_with_a_slash_round_trip(setup, tmp_path):
    """Keys are "heldout/<name>/...": a name such as "law/contracts" came back as "law" (and its head samples
    under another domain's), so a resume dropped the domain or could not read the state."""
    def renamed(monitor):
        names = {"law": "law/contracts", "chem": "law"}  # one name the other's prefix
        for field in ("loss_sets", "base_sequence_nll", "head_samples", "domains", "base_losses"):
            setattr(monitor, field, {names[k]: v for k, v in getattr(monitor, field).items()})
        return monitor

    monitor = renamed(monitor_for(setup, loss_head_samples=4))
    path = monitor.save(tmp_path / "monitor.safetensors")
    again = renamed(monitor_for(setup))
    again.base_sequence_nll, again.head_samples = {}, {}
    again.load(path)
    assert set(again.base_sequence_nll) == set(again.head_samples) == {"law/contracts", "law"}
    for name, sums in monitor.base_sequence_nll.items():
        assert torch.equal(again.base_sequence_nll[name], sums)
        assert again.loss_sets[name] == monitor.loss_sets[name]
    record = again.recheck(setup.model, forecast_latents=[0, 1])
    assert set(record.loss_delta) == {"law/contracts", "law"} and all(abs(d) < 1e-4 for d in record.loss_delta.values())


def test_a_resumed_monitor_measures_with_the_precision_of_its_saved_base_losses(setup, tmp_path):
    from safetensors.torch import load_file, save_file

    monitor = monitor_for(setup, loss_head_dtype=torch.bfloat16, loss_body_dtype=torch.bfloat16)
    record = monitor.recheck(setup.model, forecast_latents=[0, 1])
    assert all(abs(d) < 1e-4 for d in record.loss_delta.values())  # both ends through the bf16 body and head
    path = monitor.save(tmp_path / "monitor.safetensors")
    again = monitor_for(setup)  # this process would measure with the model's own dtype
    again.load(path)
    assert again.loss_head_dtype is torch.bfloat16 and again.loss_body_dtype is torch.bfloat16
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"), metadata={"format": "sts-monitor/1"})
    again.load(tmp_path / "old.safetensors")  # written before the settings existed: the model's own dtype
    assert again.loss_head_dtype is None and again.loss_body_dtype is None


def test_a_resumed_monitor_measures_through_its_saved_head_samples(setup, tmp_path):
    import copy

    from safetensors.torch import load_file, save_file

    monitor = monitor_for(setup, loss_head_samples=8)
    assert set(monitor.head_samples) == {"law", "chem"} and not monitor.head_samples["law"].recording
    assert all(abs(d) < 1e-6 for d in monitor.recheck(setup.model, forecast_latents=[0, 1]).loss_delta.values())
    path = monitor.save(tmp_path / "monitor.safetensors")
    again = monitor_for(setup)  # built without samples: the saved ones are adopted
    again.load(path)
    assert again.loss_head_samples == 8 and set(again.head_samples) == {"law", "chem"}
    changed = copy.deepcopy(setup.model)
    with torch.no_grad():
        for parameter in changed.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    saved = {name: c.delta for name, c in monitor.measure_changes(changed).items()}
    assert {name: c.delta for name, c in again.measure_changes(changed).items()} == saved
    assert all(abs(delta) > 1e-4 for delta in saved.values())
    whole = {name: c.delta for name, c in monitor_for(setup).measure_changes(changed).items()}
    assert saved != whole  # measured through the samples, not the whole head
    for name in saved:
        assert abs(saved[name] - whole[name]) < 0.2 * abs(whole[name])
    old = {k: v for k, v in load_file(str(path)).items() if not k.startswith("head_sample/")}
    save_file(old, str(tmp_path / "old.safetensors"), metadata={"format": "sts-monitor/1"})
    again.load(tmp_path / "old.safetensors")  # written before head samples: the whole head
    assert again.loss_head_samples is None and again.head_samples == {}


def test_held_out_texts_cut_to_their_first_tokens_fill_the_budget_with_more_sequences(setup):
    corpus = load_corpus(domain_texts("law", 40, length=24), name="law")
    whole, whole_tokens = Monitor.sample_sequences(corpus, setup, 200, "0:heldout:law")
    cut, cut_tokens = Monitor.sample_sequences(corpus, setup, 200, "0:heldout:law", tokens_each=8)
    assert all(sum(flags) <= 8 for _, flags in cut) and len(cut) > len(whole)
    assert cut_tokens >= 200 and sum(sum(flags) for _, flags in cut) == cut_tokens
    for (ids, flags), (long_ids, _) in zip(cut, Monitor.sample_sequences(corpus, setup, 10_000, "0:heldout:law")[0]):
        assert long_ids[: len(ids)] == ids and len(flags) <= len(ids)  # a prefix of the same text, same order


def test_the_probe_fit_encodes_a_wide_sae_in_chunks_of_bounded_size():
    """The re-check's SAE fit encoded and decoded every probe row at once: [probe tokens x d_sae] latents, 7 GB at
    train start for an 8k-token probe and a 65k-latent SAE; now a chunk of rows sized by the width at a time."""
    from sts_callback.core.extract import ENCODE_CHUNK_ELEMENTS, encode_chunk_rows
    from sts_callback.core.sae import load_sae
    from sts_callback.pipelines.monitor import fit_sums

    class DecodingSAE(TinySAE):
        def encode(self, x):
            self.rows_seen = max(getattr(self, "rows_seen", 0), x.shape[0])
            return super().encode(x)

        def decode(self, z):
            return z @ self.W_dec + self.b_dec

    rows = torch.randn(1000, 32, generator=torch.Generator().manual_seed(0))
    for width in (64, 65536):
        module = DecodingSAE(32, width, hook_name="blocks.1.hook_resid_post")
        sums = fit_sums(load_sae(module), rows)
        assert module.rows_seen == encode_chunk_rows(width) and module.rows_seen * width <= max(ENCODE_CHUNK_ELEMENTS,
                                                                                                  width)
        with torch.no_grad():
            latents = module.encode(rows)
            recon = module.decode(latents).double()
        x = rows.double()
        assert sums[0].item() == pytest.approx(float((x - recon).square().sum()), rel=1e-9)
        assert sums[2].item() == float((latents != 0).sum()) and sums[3].item() == 1000
        assert torch.allclose(sums[4:], x.sum(0))
