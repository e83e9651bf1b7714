"""An exception in one rank's local work of a collective pass (a forward, the SAE, the loss): without distribution
it propagates at once, unchanged; under distribution the rank skips its remaining forwards (runs them under sharded
parameters), still joins the pass's collectives, and the error is raised on every rank at the pass's end, naming the
failed rank. Two ranks are faked here (world size and collectives patched); tests/test_distributed.py runs two real
processes."""

import pytest
import torch
from tiny import TinySAE, domain_texts, make_model, make_tokenizer

from sts_callback.core import distributed, extract, heldout, multiple_choice
from sts_callback.core.config import STSConfig
from sts_callback.core.data import Example
from sts_callback.core.distributed import LocalFailure, _failure_summary, raise_collectively
from sts_callback.core.errors import STSNumericalError
from sts_callback.core.heldout import all_sequence_nll
from sts_callback.core.multiple_choice import answered_right
from sts_callback.pipelines.forecast import ForecastSetup

LAYER = 1


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


class Failing:
    """A forward pre-hook on decoder layer 0 that counts forwards and raises ``error`` on the first."""

    def __init__(self, model, error: Exception):
        self.error, self.calls = error, 0
        model.model.layers[0].register_forward_pre_hook(self)

    def __call__(self, module, inputs):
        self.calls += 1
        if self.calls == 1:
            raise self.error


def run_pass(kind: str, model, tokenizer):
    """One collective pass of ``kind`` over 6 texts in batches of 2 (FORWARDS of them on each of 2 ranks)."""
    texts = domain_texts("law", 6)
    if kind == "extract":
        setup = ForecastSetup.create(model, tokenizer, TinySAE(32, 64, hook_name=f"blocks.{LAYER}.hook_resid_post"),
                                     STSConfig(n_shifted=8, batch_size=2))
        setup.extractor().activations([setup.builder.single(Example(prompt=t, plain_text=True)) for t in texts])
    elif kind == "heldout":
        sequences = [(ids, [True] * (len(ids) - 1)) for ids in (tokenizer(t)["input_ids"] for t in texts)]
        with torch.no_grad():
            all_sequence_nll(model, sequences, 0, 2)
    else:
        answered_right(model, tokenizer, [{"question": t, "choices": ["a b", "c d"], "answer": 0} for t in texts])


PASSES = ["extract", "heldout", "multiple_choice"]
FORWARDS = {"extract": 2, "heldout": 2, "multiple_choice": 3}  # 3 texts a rank; 3 batches of 2 dealt to 2 ranks


@pytest.mark.parametrize("kind", PASSES)
def test_without_distribution_the_exception_propagates_unchanged(tokenizer, kind):
    model = make_model("llama")
    boom = RuntimeError("CUDA out of memory (simulated)")
    hook = Failing(model, boom)
    with pytest.raises(RuntimeError) as raised:
        run_pass(kind, model, tokenizer)
    assert raised.value is boom and str(raised.value) == "CUDA out of memory (simulated)"
    assert raised.traceback[-1].name == "__call__"  # raised from the hook itself, not re-raised at the pass's end
    assert hook.calls == 1


def as_rank(monkeypatch, me: int, others_failure: Exception | None = None, sharded: bool = False) -> None:
    """This process as rank ``me`` of 2; the other rank fails with ``others_failure`` (or not)."""
    for module in (distributed, extract, heldout, multiple_choice):
        monkeypatch.setattr(module, "world_size", lambda: 2, raising=False)
        monkeypatch.setattr(module, "parameters_are_sharded", lambda model: sharded, raising=False)
    monkeypatch.setattr(distributed, "rank", lambda: me)

    def summed(tensor):  # the other rank contributes zeros and its failure flag (the last element)
        if others_failure is not None and tensor.numel():
            tensor[-1] += 1
        return tensor

    def gathered(value):
        other = _failure_summary(others_failure, None) if others_failure is not None else None
        return [value, other] if me == 0 else [other, value]

    monkeypatch.setattr(distributed, "sum_across_ranks", summed)
    monkeypatch.setattr(distributed, "gather_objects", gathered)


@pytest.mark.parametrize("kind", PASSES)
def test_a_failed_rank_skips_its_forwards_and_raises_at_the_end_of_the_pass_naming_itself(tokenizer, kind,
                                                                                         monkeypatch):
    as_rank(monkeypatch, 1)
    model = make_model("llama")
    hook = Failing(model, RuntimeError("CUDA out of memory (simulated)"))
    with pytest.raises(RuntimeError) as raised:
        run_pass(kind, model, tokenizer)
    assert str(raised.value) == "[rank 1] CUDA out of memory (simulated)"
    assert hook.calls == 1  # the rest of its forwards skipped
    assert raised.traceback[-1].name == "raise_collectively"  # at the pass's closing collective
    if hasattr(raised.value, "__notes__"):  # Python 3.11+: where it was raised, for rank 0's log
        assert "Raised on rank 1" in raised.value.__notes__[0] and "in __call__" in raised.value.__notes__[0]


@pytest.mark.parametrize("kind", PASSES)
def test_under_sharded_parameters_a_failed_rank_keeps_running_its_forwards(tokenizer, kind, monkeypatch):
    as_rank(monkeypatch, 1, sharded=True)  # ZeRO-3 / FSDP: every forward is a collective
    model = make_model("llama")
    hook = Failing(model, RuntimeError("boom"))
    with pytest.raises(RuntimeError) as raised:
        run_pass(kind, model, tokenizer)
    assert str(raised.value) == "[rank 1] boom"
    assert hook.calls == FORWARDS[kind]


@pytest.mark.parametrize("kind", PASSES)
def test_a_rank_that_did_not_fail_raises_the_other_ranks_error(tokenizer, kind, monkeypatch):
    as_rank(monkeypatch, 0, others_failure=RuntimeError("CUDA out of memory (simulated)"))
    model = make_model("llama")
    hook = Failing(model, RuntimeError("never raised"))
    hook.calls = 1  # this rank's forwards all succeed
    with pytest.raises(RuntimeError) as raised:
        run_pass(kind, model, tokenizer)
    assert str(raised.value) == "[rank 1] CUDA out of memory (simulated)"
    assert hook.calls == 1 + FORWARDS[kind]  # its own forwards all ran


def test_no_failure_leaves_the_sums_as_they_are(monkeypatch):
    as_rank(monkeypatch, 0)
    failed = LocalFailure()
    with failed:
        counts = torch.tensor([[1.5, 2.0], [3.0, 4.0]], dtype=torch.float64)
    assert torch.equal(failed.sum_across_ranks(counts), torch.tensor([[1.5, 2.0], [3.0, 4.0]], dtype=torch.float64))
    failed.raise_everywhere()  # nothing to raise


class TakesTwo(Exception):
    def __init__(self, what, why):
        super().__init__(f"{what}: {why}")


def test_the_error_keeps_its_type_where_it_can_and_is_named_in_a_runtime_error_where_not(monkeypatch):
    class Local(Exception):  # cannot be sent to another process (a class inside a function)
        pass

    as_rank(monkeypatch, 0)
    for error, kind, message in (
            (STSNumericalError("NaN in batch 2"), STSNumericalError, "[rank 1] NaN in batch 2"),
            (torch.OutOfMemoryError("CUDA out of memory"), torch.OutOfMemoryError, "[rank 1] CUDA out of memory"),
            (TakesTwo("x", "y"), RuntimeError, "[rank 1] TakesTwo: x: y"),
            (Local("odd"), RuntimeError, "[rank 1] Local: odd")):
        monkeypatch.setattr(distributed, "gather_objects", lambda value, e=error: [value, _failure_summary(e, None)])
        with pytest.raises(Exception) as raised:
            raise_collectively(None)
        assert type(raised.value) is kind and str(raised.value) == message


def test_every_failed_rank_is_named(monkeypatch):
    as_rank(monkeypatch, 0)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    monkeypatch.setattr(distributed, "gather_objects", lambda value: [
        value, _failure_summary(ValueError("bad"), None), _failure_summary(KeyError("k"), None)])
    with pytest.raises(ValueError) as raised:
        raise_collectively(None)
    assert str(raised.value) == "[rank 1] bad (rank 2 failed too)"


def test_an_error_in_a_preference_contrasts_encoding_on_one_rank_is_raised_at_the_end_of_the_pass(tokenizer,
                                                                                                  monkeypatch):
    from sts_callback.pipelines.preference import ContrastUnit, contrast_stats

    as_rank(monkeypatch, 1)
    setup = ForecastSetup.create(make_model("llama"), tokenizer,
                                 TinySAE(32, 64, hook_name=f"blocks.{LAYER}.hook_resid_post"),
                                 STSConfig(n_shifted=8, batch_size=2))
    sequences = [setup.builder.single(Example(prompt=t, plain_text=True)) for t in domain_texts("law", 6)]
    calls = []

    def failing(self, *args, **kwargs):  # the SAE on the consumer's side of the pass, not in a forward
        calls.append(1)
        raise RuntimeError("CUDA out of memory (simulated in the SAE)")

    monkeypatch.setattr(extract.Extractor, "encoded_chunks", failing)
    with pytest.raises(RuntimeError) as raised, torch.no_grad():
        contrast_stats(setup.extractor(), [ContrastUnit([s, s], [1.0, -1.0]) for s in sequences])
    assert str(raised.value) == "[rank 1] CUDA out of memory (simulated in the SAE)"
    assert raised.traceback[-1].name == "raise_collectively" and len(calls) == 1
