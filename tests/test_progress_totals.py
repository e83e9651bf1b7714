"""The progress bars' totals are what the main process forwards: every pass is sharded (and padded) on its own."""

import contextlib
import sys

import pytest
from tiny import TinySAE, domain_texts, make_model, make_tokenizer

from sts_callback.core import distributed
from sts_callback.core.config import STSConfig
from sts_callback.pipelines import forecast as forecast_module
from sts_callback.pipelines.forecast import forecast

LAYER = 1


def sae():
    return TinySAE(32, 64, hook_name=f"blocks.{LAYER}.hook_resid_post")


def recording(monkeypatch, module) -> list:
    """The bars ``module``'s progress_bar makes (tqdm keeps its total and count ``n`` after closing)."""
    bars, real = [], module.progress_bar
    monkeypatch.setattr(module, "progress_bar", lambda *a, **k: bars.append(real(*a, **k)) or bars[-1])
    return bars


def as_main_of(monkeypatch, world: int, me: int = 0) -> None:
    """This process as rank ``me`` (the main one by default) of ``world``, the other ranks agreeing and
    contributing nothing."""
    original = distributed.world_size
    for name, module in list(sys.modules.items()):
        if name.startswith("sts_callback") and getattr(module, "world_size", None) is original:
            monkeypatch.setattr(module, "world_size", lambda: world)
    monkeypatch.setattr(distributed, "rank", lambda: me)
    monkeypatch.setattr(distributed, "sum_across_ranks", lambda tensor: tensor)
    monkeypatch.setattr(distributed, "gather_objects", lambda value: [value] * world)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_forecast_bar_ends_at_its_total(monkeypatch, world):
    # odd sizes (5 and 3 domain texts), so that the passes pad their shards each
    as_main_of(monkeypatch, world)
    bars = recording(monkeypatch, forecast_module)
    tokenizer = make_tokenizer()
    forecast(make_model("llama"), tokenizer, sae(),
             domain_texts("law", 7, seed=3), {"chem": domain_texts("chem", 5), "food": domain_texts("food", 3)},
             STSConfig(n_shifted=8, shift_tokens=10_000, domain_tokens=10_000, batch_size=2,
                       n_domain_demonstrations=1), progress=True)
    [bar] = bars
    assert bar.n == bar.total, (bar.n, bar.total)


@pytest.mark.parametrize("world", [1, 2])
def test_the_in_context_loss_pass_has_its_own_bar(monkeypatch, world):
    """The in-context NLL change (full forwards, after the SAE passes) counts its sequences on a bar of its own:
    to its total on one process; on several, a running count of the main process's whole batches."""
    as_main_of(monkeypatch, world)
    bars = recording(monkeypatch, forecast_module)
    forecast(make_model("llama"), make_tokenizer(), sae(), domain_texts("law", 7, seed=3),
             {"chem": domain_texts("chem", 5), "food": domain_texts("food", 3)},
             STSConfig(n_shifted=8, shift_tokens=10_000, domain_tokens=10_000, batch_size=2,
                       n_domain_demonstrations=1, icl_loss_tokens=64), progress=True)
    _, in_context = bars
    assert in_context.desc.startswith("STS in-context loss") and in_context.n > 0
    assert in_context.total == (in_context.n if world == 1 else None)


@pytest.mark.parametrize("world", [1, 2])
def test_the_preference_forecast_bar_ends_at_its_total(monkeypatch, world):
    """The contrast pass shards whole preference pairs (two sequences each), not sequences."""
    from sts_callback.pipelines.preference import preference_forecast

    as_main_of(monkeypatch, world)
    bars = recording(monkeypatch, forecast_module)
    chosen, rejected = domain_texts("law", 5, seed=3), domain_texts("food", 5, seed=3)
    pairs = [{"prompt": "Say something.", "chosen": c, "rejected": r} for c, r in zip(chosen, rejected)]
    preference_forecast(make_model("llama"), make_tokenizer(), sae(),
                        pairs, {"chem": domain_texts("chem", 5), "food": domain_texts("food", 3)},
                        STSConfig(n_shifted=8, shift_tokens=10_000, domain_tokens=10_000, batch_size=2,
                                  n_domain_demonstrations=1), progress=True)
    [bar] = bars
    assert bar.n == bar.total, (bar.n, bar.total)


@pytest.mark.parametrize("world", [1, 2])
def test_the_gate_bar_ends_at_its_total(monkeypatch, world, capsys):
    """The gate's passes are sharded, but every rank scores all the candidates' examples."""
    from sts_callback.pipelines import gate
    from sts_callback.pipelines.gate import MixtureRejected, gate_mixture

    as_main_of(monkeypatch, world)
    bars = recording(monkeypatch, gate)
    chosen, rejected = domain_texts("law", 5, seed=4), domain_texts("food", 5, seed=4)
    pairs = [{"prompt": "Say something.", "chosen": c, "rejected": r} for c, r in zip(chosen, rejected)]
    with contextlib.suppress(MixtureRejected):
        gate_mixture(make_model("llama"), make_tokenizer(), sae(),
                     {"a": domain_texts("law", 7, seed=3), "b": domain_texts("code", 5, seed=3), "pairs": pairs},
                     {"chem": domain_texts("chem", 5), "food": domain_texts("food", 3)}, "chem",
                     config=STSConfig(n_shifted=8, shift_tokens=10_000, domain_tokens=10_000, batch_size=2,
                                      n_domain_demonstrations=1), progress=True)
    [bar] = bars
    assert bar.n == bar.total, (bar.n, bar.total)
    # the per-example scores, often most of the work, are said before it starts: 7 + 5 examples, 5 pairs of two
    assert f"STS gate: {bar.total} steps of work, {7 + 5 + 2 * 5} of them the per-example scores" in \
        capsys.readouterr().err
