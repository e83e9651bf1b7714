"""Re-checks with the real weights: the actual shift (base vs current), domains re-scored on it, and the
held-out language-model loss of each domain. Independent of any Trainer; the callback decides when.

The base of a full fine-tune is the residual stream of the probe tokens, captured once at train start and
kept (a few MB: probe tokens x hidden size), so no second copy of the model is needed. With PEFT the base
is the same model with its adapters disabled.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..scoring import score
from ..core.capture import unwrap_model
from ..core.errors import STSDataWarning, STSInputError, STSNumericalError
from ..core.data import Corpus, TokenSequence, first_counted, last_counted, sample_within_budget
from ..core.distributed import LocalFailure, gather_objects, warn_on_main
from ..core.extract import ConditionStats, Extractor, PairedStats, encode_chunk_rows
from ..core.sae_fit import add_fit_sums, fit_from_sums, new_fit_sums
from .forecast import ForecastSetup, inference_mode
from .recheck import Recheck
from ..core.head_sample import HeadSamples
from ..core.heldout import HeadInPrecision, LossChange, all_sequence_nll, sequence_nll, sequential_change
from ..core.stats import ActivationStats, ShiftStats, StatsGroup
from ..core.torch_utils import pad_token_id



def peft_model_of(model: nn.Module) -> nn.Module | None:
    """The PeftModel inside DDP / DeepSpeed wrappers, if the model has adapters."""
    current = model
    for _ in range(5):
        if hasattr(current, "disable_adapter") and hasattr(current, "get_base_model"):
            return current
        current = getattr(current, "module", None)
        if current is None:
            return None
    return None


def base_parameters_trained(model: nn.Module) -> list[str]:
    """The trainable parameters of a PEFT model that are no adapter's (``bias="all"``, norms unfrozen beside
    LoRA): ``disable_adapter()`` leaves them as trained, so the adapters-disabled model is then not the train start.
    An adapter's parameters (every tuner's, modules_to_save copies, trainable tokens, a prompt encoder) sit under
    its name (``lora_A.default.weight``, ``modules_to_save.default.weight``, ``prompt_encoder.default.embedding``)."""
    peft = peft_model_of(model)
    if peft is None:
        return []
    names = [re.escape(str(name)) for name in getattr(peft, "peft_config", None) or {}]
    if not names:
        return []
    adapter = re.compile(rf"(?:^|\.)(?:{'|'.join(names)})(?:\.|$)")
    return [name for name, parameter in peft.named_parameters() if parameter.requires_grad and not adapter.search(name)]


def active_adapters(model: nn.Module) -> tuple[str, ...] | None:
    """The adapters a PEFT model runs with now: ``()`` inside ``disable_adapter()`` (the base model alone), else
    its active adapters' names; ``None`` for a model without adapters."""
    peft = peft_model_of(model)
    if peft is None:
        return None
    layers = [m for m in peft.modules() if hasattr(m, "disable_adapters") and hasattr(m, "active_adapters")]
    if layers and all(bool(m.disable_adapters) for m in layers):
        return ()
    names = getattr(peft, "active_adapters", None)
    names = [names] if isinstance(names, str) else list(names or [])
    return tuple(str(n) for n in names)


@dataclass
class DomainBaseline(StatsGroup):
    """A target domain's statistics under the base model (from the forecast or the train-start pass)."""

    latents: ActivationStats
    latent_shift: ShiftStats | None = None  # in-context shift with the domain's own demonstrations


def nll_sums(model: nn.Module, sequences: Sequence[TokenSequence], pad: int, batch_size: int) -> tuple[float, int]:
    """(NLL sum, token count) of the counted tokens: ``sequences`` are (ids, counted flags for the last
    len(flags) ids); the LM head runs only at counted positions, in chunks. Call under no_grad / eval mode."""
    sums = sequence_nll(model, sequences, pad, batch_size).sum(0)
    return float(sums[0]), int(sums[1])


def fit_sums(sae, rows: torch.Tensor) -> torch.Tensor:
    """Sums behind the SAE's fit on residual rows [n, d] (:mod:`~sts_callback.core.sae_fit`), to add across
    batches and ranks."""
    out = new_fit_sums(rows.shape[-1])
    if rows.shape[0] == 0:  # a rank without probe rows: no encode of an empty batch (a custom SAE may refuse it)
        return out
    for chunk in rows.split(encode_chunk_rows(getattr(sae, "d_sae", 0))):  # [rows x d_sae] latents of a chunk
        with torch.no_grad():
            latents = sae.encode(chunk)
            add_fit_sums(out, chunk, latents, sae.decode(latents).float())
        del latents
    return out


LOSS_DTYPE_FIELDS = ("loss_head_dtype", "loss_body_dtype")  # saved with the base losses they measured


@dataclass
class Monitor:
    """What re-checks need, prepared once at train start.

    Args:
        setup: model-independent forecast setup (SAE, layer, prompt builder, config).
        probe: token sequences of the training probe (ids, counted flags).
        domains: base statistics of each target domain.
        loss_sets: held-out sequences of each domain for the loss measurement.
    """

    setup: ForecastSetup
    probe: list[TokenSequence]
    domains: dict[str, DomainBaseline]
    loss_sets: dict[str, list[TokenSequence]]
    base_residuals: torch.Tensor | None = None
    base_losses: dict[str, float] = field(default_factory=dict)
    loss_batch_size: int = 4
    accuracy_sets: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # multiple-choice domains
    lm_eval_targets: dict[str, Any] = field(default_factory=dict)  # lm-evaluation-harness tasks
    base_accuracy: dict[str, float] = field(default_factory=dict)
    accuracy_items: dict[str, int] = field(default_factory=dict)  # items each accuracy is read from (all ranks)
    answers: dict[str, list[bool]] = field(default_factory=dict)  # the last measurement's right answers, per item
    base_answers: dict[str, list[bool]] = field(default_factory=dict)  # the train start's
    base_sequence_nll: dict[str, torch.Tensor] = field(default_factory=dict)  # [n, 2] per held-out sequence
    base_loss_seconds: dict[str, float] = field(default_factory=dict)  # each domain's whole loss set at train start
    loss_half_width: float | None = None  # stop measuring a domain once its change's 95% CI is this narrow
    loss_tolerances: dict[str, float] = field(default_factory=dict)  # protected: stop once surely above
    seed: str = "0"
    loss_domains: int | None = None  # unprotected domains measured per re-check, in turns; None: all
    # unprotected domains measured at every re-check all the same (one a Trainer's metric_for_best_model reads)
    always_measured: set[str] = field(default_factory=set)
    # the settings the probe, held-out and multiple-choice samples were drawn with (saved with them), and those a
    # loaded state was drawn with (None before a load, or from an older file)
    sampled_with: dict[str, Any] = field(default_factory=dict)
    saved_sampled_with: dict[str, Any] | None = None
    turn: int = 0  # unprotected domains measured so far (the rotation's position)
    loss_head_dtype: torch.dtype | None = None  # the LM head's matmul dtype for held-out losses; None: its own
    loss_body_dtype: torch.dtype | None = None  # the body's autocast dtype for held-out losses; None: no autocast
    loss_head_samples: int | None = None  # tail draws per token of the re-checks' sampled head; None: the whole head
    head_samples: dict[str, HeadSamples] = field(default_factory=dict)  # recorded by the base pass, per domain

    # -------------------------------------------------------------- building
    @staticmethod
    def sample_sequences(corpus: Corpus, setup: ForecastSetup, budget: int, seed: str,
                         tokens_each: int | None = None) -> tuple[list[TokenSequence], int]:
        """A seeded sample of ``corpus`` within ``budget`` counted tokens; ``tokens_each``: each text cut to its
        first counted tokens (more, shorter sequences: a paired change's interval narrows sooner)."""
        indices, tokens = sample_within_budget(corpus, setup.builder, budget, random.Random(seed),
                                               tokens_each=tokens_each)
        examples = [corpus[i] for i in indices]
        sequences = [setup.builder.single(example) for example in examples]
        if tokens_each is not None:  # a prompt + answer keeps its answer's tokens, as its cut to max_query_tokens
            sequences = [(last_counted if example.keep_end else first_counted)(sequence, tokens_each)
                         for example, sequence in zip(examples, sequences)]
        first: dict[tuple[int, ...], TokenSequence] = {}
        for sequence in sequences:
            first.setdefault(tuple(sequence[0]), sequence)
        unique = list(first.values())
        if len(unique) < len(sequences):  # copies would count as independent texts: a falsely narrow interval
            tokens = sum(sum(counted) for _, counted in unique)
            # said once, by the main process (every rank keeps the same sample). The wording fits both uses: a
            # target's held-out set (a loss change) and the training probe (the latents' shift, no loss change)
            warn_on_main(f"{corpus.name!r}: {len(sequences) - len(unique)} of the {len(sequences)} texts sampled "
                         "to measure it are exact copies of others; each is measured once (counted as separate "
                         "texts, copies would weigh their text more in the re-checks' measurements, and make a "
                         "held-out set's loss change look more precise than it is). De-duplicate the data to "
                         "measure more texts.", STSDataWarning, stacklevel=2)
        return unique, tokens

    def _extractor(self, model: nn.Module) -> Extractor:
        return self.setup.extractor(model=model)

    def probe_rows(self, model: nn.Module, sequences: Sequence[TokenSequence] | None = None,
                   ) -> dict[int, torch.Tensor]:
        """Residual rows at the counted tokens of this process's probe sequences (or of ``sequences``): global
        index -> [rows, d] (float32, CPU). Every rank runs the same number of forwards."""
        sequences = self.probe if sequences is None else sequences
        extractor = self._extractor(model)
        part, sizes = extractor.share_batches([len(ids) for ids, _ in sequences])
        local = [sequences[i] for i in part.indices]
        out: dict[int, torch.Tensor] = {}
        with inference_mode(model):
            for item in extractor.iter_rows(local, "the training probe", sizes):
                with extractor.failed:
                    rows = item.rows.float().cpu()
                    for row_in_batch, i in enumerate(item.batch):
                        if part.counted[i]:
                            out[part.indices[i]] = rows[item.where[0] == row_in_batch]
        extractor.finish()  # a failure on any rank raised on every rank
        return out

    def _probe_offsets(self) -> list[int]:
        offsets = [0]
        for _, flags in self.probe:
            offsets.append(offsets[-1] + sum(flags))
        return offsets

    def probe_residuals(self, model: nn.Module, sequences: Sequence[TokenSequence] | None = None) -> torch.Tensor:
        """Residual rows at all the probe's (or ``sequences``') counted tokens in their order (gathered from every
        rank)."""
        sequences = self.probe if sequences is None else sequences
        rows: dict[int, torch.Tensor] = {}
        for part in gather_objects(self.probe_rows(model, sequences)):
            rows.update(part)
        return torch.cat([rows[i] for i in range(len(sequences))]) if sequences else \
            torch.zeros(0, self.setup.sae.d_in)

    def capture_base(self, model: nn.Module, autocast=None) -> None:
        """Keep the probe's residuals under the model as it is at train start (all of them, on every rank, so
        that any rank layout can resume from the saved file): each re-check then needs one forward, and the shift
        is this run's. With PEFT too: the adapters-disabled model is not the train-start model when an adapter
        starts non-zero (``init_lora_weights=False``, a trained adapter loaded to train on) or base weights train
        beside the adapters, and would read the adapter's whole effect (or none of the base's change).
        ``autocast``: the trainer's, as every re-check reads the current residuals under it (without it a bf16 run's
        shift would include the float32 / bf16 difference before any step)."""
        with autocast() if autocast else nullcontext():
            self.base_residuals = self.probe_residuals(model)

    def adapters_start_at_the_base(self, model: nn.Module, sequences: int = 2, autocast=None) -> bool:
        """Whether ``model`` with its PEFT adapters disabled gives the train-start residuals (kept by
        :meth:`capture_base`) on the probe's first ``sequences``: true for adapters that start at zero (PEFT's
        default LoRA), false for one trained before or initialised non-zero, whose disabled model is not the run's
        start. Call it at train start; collective (every rank runs the forwards)."""
        peft = peft_model_of(model)
        if peft is None or self.base_residuals is None or not self.probe:
            return True
        with peft.disable_adapter(), (autocast() if autocast else nullcontext()):
            disabled = self.probe_residuals(model, self.probe[:sequences])
        start = self.base_residuals[: len(disabled)]
        # float noise only (DoRA's magnitude at init rounds the weight): far below any adapter's effect
        return bool(torch.linalg.norm(disabled - start) <= 1e-3 * torch.linalg.norm(start))

    def refresh_probe(self, model: nn.Module, sequences: Sequence[TokenSequence],
                      base_model: nn.Module | None = None) -> None:
        """Re-check on ``sequences`` from now on (an RL run's fresh completions of the current policy). Their base
        residuals come from ``base_model`` (a frozen reference copy, such as GRPO's ``ref_model``) or, with PEFT,
        from the model with its adapters disabled; a full fine-tune without a base model cannot refresh."""
        if base_model is None and peft_model_of(model) is None:
            raise ValueError("A fresh probe of a full fine-tune needs its base model (base_model=...): the current "
                             "weights are not the base.")
        self.probe = list(sequences)
        self.base_residuals = None
        if base_model is not None:
            self.base_residuals = self.probe_residuals(base_model)
        else:  # the train-start weights are gone: the adapters-disabled model stands for them
            with peft_model_of(model).disable_adapter():
                self.base_residuals = self.probe_residuals(model)

    def measure_losses(self, model: nn.Module, autocast=None) -> dict[str, float]:
        """Mean token NLL of each domain's held-out texts (special tokens and padding excluded).

        ``autocast``: a factory of the trainer's autocast context (called once per use).
        """
        head = self._head_precision()
        self.head_samples = {}
        with inference_mode(model), (autocast() if autocast else nullcontext()):
            for name, everyone in self.loss_sets.items():
                began = time.perf_counter()
                if self.loss_head_samples:  # recorded now, read by every re-check
                    self.head_samples[name] = HeadSamples(self.loss_head_samples, seed=f"{self.seed}:{name}")
                self.base_sequence_nll[name] = all_sequence_nll(model, everyone, self._pad(), self.loss_batch_size,
                                                                head_precision=head, body_dtype=self.loss_body_dtype,
                                                                head_samples=self.head_samples.get(name))
                if name in self.head_samples:
                    self.head_samples[name].recording = False
                self.base_loss_seconds[name] = time.perf_counter() - began
        totals = {name: sums.sum(0) for name, sums in self.base_sequence_nll.items()}
        return {name: float(t[0] / t[1].clamp(min=1)) for name, t in totals.items()}

    def _head_precision(self) -> HeadInPrecision | None:
        """Base and re-check losses run head and body alike (a paired change needs both ends measured the same
        way)."""
        return None if self.loss_head_dtype is None else HeadInPrecision(self.loss_head_dtype)

    def _pad(self) -> int:
        tokenizer = self.setup.builder.tokenizer
        return pad_token_id(tokenizer)

    def in_turn(self) -> list[str]:
        """The unprotected domains (those without a tolerance) from the next in turn onwards, at most
        :attr:`loss_domains` of them: a re-check measuring the first k moves the turn on by k, so each is measured
        every ceil(others / k) re-checks."""
        others = [name for name in self.loss_sets if not self.measured_every_time(name)]
        count = len(others) if self.loss_domains is None else min(self.loss_domains, len(others))
        return [others[(self.turn + i) % len(others)] for i in range(count)]

    def measured_every_time(self, name: str) -> bool:
        """Measured at every re-check (protected, or read by metric_for_best_model): outside the rotation."""
        return name in self.loss_tolerances or name in self.always_measured

    def domains_in_turn(self, unprotected: int | None = None) -> list[str]:
        """The domains whose held-out loss the next re-check measures: every protected one and the first
        ``unprotected`` of :meth:`in_turn` (default: all of them)."""
        turn = set(self.in_turn()[:unprotected])
        return [name for name in self.loss_sets if self.measured_every_time(name) or name in turn]

    def measure_changes(self, model: nn.Module, autocast=None, names: Sequence[str] | None = None,
                        ) -> dict[str, LossChange]:
        """Each domain's (of ``names``; default all) relative held-out loss change since :meth:`measure_losses`,
        measured sequentially on the same sequences (a seeded order) until :attr:`loss_half_width` is reached;
        all of them when ``None``."""
        out, local = {}, {}
        head = self._head_precision()  # its cast weight lives for this re-check only
        with inference_mode(model), (autocast() if autocast else nullcontext()):
            for name, everyone in self.loss_sets.items():
                if names is not None and name not in names:
                    continue
                began = time.perf_counter()
                samples = self.head_samples.get(name)
                fallbacks = samples.fallbacks if samples is not None else 0
                order = list(range(len(everyone)))
                random.Random(f"{self.seed}:loss-order:{name}").shuffle(order)
                out[name] = sequential_change(
                    lambda indices, everyone=everyone, name=name: all_sequence_nll(
                        model, everyone, self._pad(), self.loss_batch_size, indices, head, self.loss_body_dtype,
                        self.head_samples.get(name)),
                    self.base_sequence_nll[name], order, [sum(flags) for _, flags in everyone],
                    half_width=self.loss_half_width, tolerance=self.loss_tolerances.get(name))
                out[name].seconds = time.perf_counter() - began
                if samples is not None:
                    local[name] = samples.fallbacks - fallbacks
        if local:  # every rank's count (each measured its share of the batches), in one exchange
            for counts in gather_objects(local):
                for name, count in counts.items():
                    out[name].head_fallbacks += count
        return out

    @property
    def loss_set_tokens(self) -> dict[str, int]:
        """Each domain's held-out loss set's counted tokens (from the train-start measurement)."""
        return {name: int(sums[:, 1].sum()) for name, sums in self.base_sequence_nll.items()}

    def _accuracy_intervals(self) -> dict[str, list[float]]:
        """The 95% interval of each multiple-choice domain's accuracy change, from its items answered now and at
        train start (none for lm-eval tasks, or for a start kept by an older version without its answers)."""
        from ..core.multiple_choice import accuracy_change_interval

        out = {}
        for name, answers in self.answers.items():
            interval = accuracy_change_interval(self.base_answers.get(name, []), answers)
            if interval is not None:
                out[name] = list(interval)
        return out

    def measure_accuracy(self, model: nn.Module, autocast=None) -> dict[str, float]:
        """Accuracy of each multiple-choice domain's sampled items (every rank its share, counts summed)."""
        from ..core.multiple_choice import answered_right

        out = {}
        with inference_mode(model), (autocast() if autocast else nullcontext()):
            for name, items in self.accuracy_sets.items():
                self.answers[name] = answered_right(model, self.setup.builder.tokenizer, items)
                out[name] = sum(self.answers[name]) / len(items) if items else float("nan")
                self.accuracy_items[name] = len(items)
            if self.lm_eval_targets:
                # each rank evaluates the tasks whole, alone; a failure on one rank still fails the re-check on
                # every rank, so that their records (and the guard's decisions) stay the same
                failed = LocalFailure()
                for name, target in self.lm_eval_targets.items():
                    with failed:
                        out[name] = target.evaluate(model, self.setup.builder.tokenizer)
                failed.raise_everywhere()
        return out

    # -------------------------------------------------------------- re-check
    def sae_fit(self, model: nn.Module, autocast=None) -> dict[str, float] | None:
        """How well the SAE reconstructs the model's residuals on the probe: FVU and mean L0 (``None`` when the
        SAE cannot decode)."""
        if not self.setup.sae.can_decode:
            return None
        with autocast() if autocast else nullcontext():
            return self._fit(self.probe_rows(model))

    def _fit(self, rows: dict[int, torch.Tensor]) -> dict[str, float] | None:
        if not self.setup.sae.can_decode:
            return None
        d = self.setup.sae.d_in
        failed = LocalFailure()
        sums = torch.zeros(4 + d, dtype=torch.float64)
        with failed:
            sums = fit_sums(self.setup.sae, torch.cat(list(rows.values())) if rows else torch.zeros(0, d))
        return fit_from_sums(failed.sum_across_ranks(sums))

    def actual_shift(self, model: nn.Module, autocast=None) -> ShiftStats:
        """Per-latent E[(h_current - h_base)^2] at the probe tokens (each rank its share, summed)."""
        shift, _ = self._actual_shift_and_fit(model, autocast)
        return shift

    def _actual_shift_and_fit(self, model: nn.Module, autocast=None):
        with autocast() if autocast else nullcontext():
            current = self.probe_rows(model)
            peft = peft_model_of(model)
            if self.base_residuals is not None:
                offsets = self._probe_offsets()
                base = {i: self.base_residuals[offsets[i]: offsets[i + 1]] for i in current}
            elif peft is not None:
                with peft.disable_adapter():
                    base = self.probe_rows(model)
            else:
                raise RuntimeError("No base residuals: call capture_base(model) at train start.")
        shift = ShiftStats(self.setup.sae.d_sae)
        order = sorted(current)
        failed = LocalFailure()  # this rank's encoding, before the sums every rank takes part in
        if order:
            with failed:
                device = self.setup.sae.module.W_enc.device if hasattr(self.setup.sae.module, "W_enc") else "cpu"
                base_rows = torch.cat([base[i] for i in order])
                current_rows = torch.cat([current[i] for i in order])
                with torch.no_grad():
                    step = encode_chunk_rows(self.setup.sae.d_sae)
                    for b, c in zip(base_rows.split(step), current_rows.split(step)):
                        shift.update(self.setup.sae.encode(b.to(device)).float().cpu(),
                                     self.setup.sae.encode(c.to(device)).float().cpu())
        failed.raise_everywhere()
        return shift.all_reduce(), self._fit(current)

    def recheck(self, model: nn.Module, forecast_latents: list[int] | None, autocast=None,
                unprotected: int | None = None) -> Recheck:
        """The actual shift, the domains re-scored on it, and the held-out losses vs train start: every
        protected domain's and the first ``unprotected`` (default: all) of :meth:`in_turn`."""
        start = time.perf_counter()
        config = self.setup.config
        try:
            shift, fit = self._actual_shift_and_fit(model, autocast)
            probe_error = None
        except STSNumericalError as err:  # a diverged model: its held-out losses (not finite) are what the guard needs
            shift, fit, probe_error = None, None, str(err)
        timings = {"probe": time.perf_counter() - start}
        scores, latents, values = {}, torch.zeros(0, dtype=torch.long), torch.zeros(0)
        if shift is not None:
            latents, values = score.shifted_latents(shift, config.n_shifted)
            moved = values != 0  # a latent that did not move is no shifted latent (NaN stays: it is a finding)
            latents, values = latents[moved], values[moved]
            for name, base in self.domains.items():
                entry = {"sts_act": score.sts_act(base.latents, latents),
                         "sts_sq": score.sts_sq(base.latents, latents)}
                if base.latent_shift is not None:
                    entry["sts_icl"] = score.sts_icl(base.latent_shift, latents)
                scores[name] = entry
        t0 = time.perf_counter()
        names = self.domains_in_turn(unprotected)
        changes = self.measure_changes(model, autocast, names)
        timings["losses"] = time.perf_counter() - t0
        loss_delta = {name: change.delta if self.base_losses.get(name) else None for name, change in changes.items()}
        losses = {name: self.base_losses[name] * (1 + change.delta) if name in self.base_losses else math.nan
                  for name, change in changes.items()}
        t0 = time.perf_counter()
        accuracy = self.measure_accuracy(model, autocast) if self.accuracy_sets or self.lm_eval_targets else {}
        timings["accuracy"] = time.perf_counter() - t0
        # the turn moves on once the re-check has measured: a failed one leaves these domains theirs
        self.turn += sum(not self.measured_every_time(name) for name in names)
        return Recheck(
            shift_total=float(shift.mean_shift().sum()) if shift is not None else None,
            shifted_latents=latents.tolist(),
            shift_values=[float(v) for v in values],
            overlap_with_forecast=(score.overlap(latents, forecast_latents) if forecast_latents and shift is not None
                                   else None),
            scores=scores,
            loss=losses,
            loss_delta=loss_delta,
            loss_delta_ci={name: [v if math.isfinite(v) else None for v in (c.low, c.high)]  # one sequence: no
                           for name, c in changes.items()},  # interval (-inf, inf is no strict JSON)
            loss_delta_se={name: c.standard_error if math.isfinite(c.standard_error) else None
                           for name, c in changes.items()},
            loss_tokens={name: c.tokens for name, c in changes.items()},
            loss_seconds={name: c.seconds for name, c in changes.items()},
            loss_head_fallbacks={name: c.head_fallbacks for name, c in changes.items() if c.head_fallbacks},
            accuracy=accuracy,
            accuracy_delta={name: value - self.base_accuracy[name] if name in self.base_accuracy else None
                            for name, value in accuracy.items()},
            accuracy_delta_ci=self._accuracy_intervals(),
            accuracy_items={name: self.accuracy_items[name] for name in accuracy if name in self.accuracy_items},
            probe_tokens=shift.tokens if shift is not None else 0,
            sae_fit=fit,
            probe_error=probe_error,
            seconds=time.perf_counter() - start,
            timings=timings,
        )

    # -------------------------------------------------------------- persistence
    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.base_residuals is not None:
            out["probe/base_residuals"] = self.base_residuals.contiguous()
        # The probe itself, so that a resume re-checks the very sequences whose base residuals are kept (an RL
        # run's probe is the policy's train-start rollouts, which cannot be sampled again).
        out.update(_sequence_tensors("probe/", self.probe))
        for name, sums in self.base_sequence_nll.items():
            out[f"heldout/{_key(name)}/base_sequence_nll"] = sums.contiguous()
            # the held-out texts themselves: a resume measures the very sequences whose base NLL is kept, however
            # a later version samples them
            out.update(_sequence_tensors(f"heldout_set/{_key(name)}/", self.loss_sets[name]))
        for name, samples in self.head_samples.items():
            out.update({f"head_sample/{_key(name)}/{key}": value for key, value in samples.state_dict().items()})
        for name, base in self.domains.items():
            out.update({f"domain/{_key(name)}/{key}": value for key, value in base.state_dict().items()})
        return out

    def sae_identity(self) -> dict[str, Any]:
        """The SAE the statistics are measured with: hook, width and a hash of its weights."""
        sae = self.setup.sae
        return {"hook_name": sae.hook_name, "d_sae": sae.d_sae, "fingerprint": sae.fingerprint()}

    def save(self, path: Path) -> Path:
        from safetensors.torch import save_file

        from ..core.atomic import atomic_write

        tensors = self.tensors()
        metadata = {"format": "sts-monitor/1", "sampled_with": json.dumps(self.sampled_with),
                    "sae": json.dumps(self.sae_identity()),
                    **{name: str(getattr(self, name)).removeprefix("torch.") for name in LOSS_DTYPE_FIELDS}}
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    def load(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as saved:
            tensors = {key: saved.get_tensor(key) for key in saved.keys()}
            # the base losses were measured in these precisions: keep measuring so (older files: the model's own)
            metadata = saved.metadata() or {}
        self.saved_sampled_with = json.loads(metadata["sampled_with"]) if "sampled_with" in metadata else None
        if "sae" in metadata:  # older files: not recorded
            saved, now = json.loads(metadata["sae"]), self.sae_identity()
            if saved != now:
                def shown(sae: dict[str, Any]) -> str:
                    return f"{sae['hook_name']}, width {sae['d_sae']}, weights {sae['fingerprint']}"
                raise STSInputError(
                    f"Resuming: {path}'s train-start statistics were measured with another SAE ({shown(saved)}) "
                    f"than the one given now ({shown(now)}); re-checks would compare one SAE's latents with the "
                    "other's. Resume with the SAE the run started with, or start a new run.")
        for name in LOSS_DTYPE_FIELDS:
            saved_dtype = metadata.get(name, "None")
            setattr(self, name, None if saved_dtype == "None" else getattr(torch, saved_dtype))
        self.base_residuals = tensors.get("probe/base_residuals")
        if "probe/ids" in tensors:  # written since the probe is saved; older files: the probe sampled again
            self.probe = _sequences_from(tensors, "probe/")
        self.base_sequence_nll = {_name(k.split("/")[1]): v for k, v in tensors.items() if k.startswith("heldout/")}
        for name, sums in self.base_sequence_nll.items():
            if f"heldout_set/{_key(name)}/ids" in tensors:  # written since the held-out texts are saved
                self.loss_sets[name] = _sequences_from(tensors, f"heldout_set/{_key(name)}/")
            elif name in self.loss_sets and [int(n) for n in sums[:, 1]] != [sum(f) for _, f in self.loss_sets[name]]:
                raise STSInputError(
                    f"Resuming: the held-out texts of {name!r} sampled now ({len(self.loss_sets[name])} sequences) "
                    f"are not the {sums.shape[0]} measured at train start: the checkpoint was written by an older "
                    "sts-callback that sampled them otherwise. Resume with the version that started the run, or "
                    "start a new run.")
        def under(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        # older files, or a run without them: re-checks measure through the whole head
        self.head_samples = {}
        for name in self.base_sequence_nll:
            if state := under(f"head_sample/{_key(name)}/"):
                self.head_samples[name] = HeadSamples.from_state_dict(state, seed=f"{self.seed}:{name}")
        self.loss_head_samples = next(iter(self.head_samples.values())).tail if self.head_samples else None
        for name in self.domains:
            if saved := under(f"domain/{_key(name)}/"):
                self.domains[name] = DomainBaseline.from_state_dict(saved)


def _key(name: str) -> str:
    """A domain name as one part of a tensor key: a name may hold "/" (``math/algebra``), the keys' separator."""
    return name.replace("%", "%25").replace("/", "%2F")


def _name(key: str) -> str:
    return key.replace("%2F", "/").replace("%25", "%")


def _sequence_tensors(prefix: str, sequences: list[TokenSequence]) -> dict[str, torch.Tensor]:
    return {f"{prefix}ids": torch.tensor([t for ids, _ in sequences for t in ids], dtype=torch.int64),
            f"{prefix}id_counts": torch.tensor([len(ids) for ids, _ in sequences], dtype=torch.int64),
            f"{prefix}counted": torch.tensor([f for _, flags in sequences for f in flags], dtype=torch.bool),
            f"{prefix}counted_counts": torch.tensor([len(flags) for _, flags in sequences], dtype=torch.int64)}


def _sequences_from(tensors: dict[str, torch.Tensor], prefix: str) -> list[TokenSequence]:
    ids = tensors[f"{prefix}ids"].split(tensors[f"{prefix}id_counts"].tolist())
    flags = tensors[f"{prefix}counted"].split(tensors[f"{prefix}counted_counts"].tolist())
    return [(i.tolist(), f.tolist()) for i, f in zip(ids, flags)]


def domain_baselines_from(stats: dict[str, ConditionStats | PairedStats]) -> dict[str, DomainBaseline]:
    return {name: DomainBaseline(latents=s.latents, latent_shift=getattr(s, "latent_shift", None))
            for name, s in stats.items()}


def is_peft(model: nn.Module) -> bool:
    return peft_model_of(model) is not None


__all__ = ["DomainBaseline", "Monitor", "domain_baselines_from", "is_peft", "peft_model_of", "unwrap_model"]
