"""Forecasts that would be silently meaningless are refused or flagged (issue 15, defects 5 and 9)."""

import warnings

import pytest
import torch
from tiny import TinySAE, domain_texts, make_model, make_tokenizer

from sts_callback import STSConfig, STSConfigError, STSDataWarning, STSInputError, forecast


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model():
    return make_model("llama")


def config(**overrides):
    values = dict(n_shifted=12, shift_tokens=300, domain_tokens=150, batch_size=4, n_domain_demonstrations=3)
    values.update(overrides)
    return STSConfig(**values)


def targets(**extra):
    return {**{d: domain_texts(d, n=15) for d in ("code", "chem")}, **extra}


def sae(hook_name="blocks.1.hook_resid_post"):
    return TinySAE(32, 64, hook_name=hook_name)


def test_a_model_without_a_language_model_head_is_refused_before_any_work(tokenizer):
    import transformers as tf

    reward_model = tf.LlamaForSequenceClassification(tf.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=0))
    with pytest.raises(STSConfigError, match="needs a causal language model.*LlamaForSequenceClassification"):
        forecast(reward_model, tokenizer, sae(), domain_texts("law", 30), targets(), config())


@pytest.mark.parametrize("kind", ["t5", "bart", "bert"])
def test_an_encoder_decoder_or_masked_language_model_is_refused_before_any_work(tokenizer, kind):
    # T5 was read at its encoder and crashed in the held-out loss; BART at its decoder and BERT at its encoder,
    # both silently, with a "next-token" loss that means nothing for them
    import transformers as tf

    sizes = dict(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = {"t5": lambda: tf.T5ForConditionalGeneration(tf.T5Config(
                 d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, decoder_start_token_id=0, **sizes)),
             "bart": lambda: tf.BartForConditionalGeneration(tf.BartConfig(
                 d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, **sizes)),
             "bert": lambda: tf.BertForMaskedLM(tf.BertConfig(
                 hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **sizes))}[kind]()
    kind_words = "a masked" if kind == "bert" else "an encoder-decoder"
    with pytest.raises(STSConfigError, match=f"decoder-only causal language model.*is {kind_words}"):
        forecast(model, tokenizer, sae("model.layers.1"), domain_texts("law", 30), targets(), config())


def test_a_gpu_device_on_a_machine_without_one_is_refused_before_any_work(tokenizer, model, monkeypatch):
    # a CUDA build of torch where no GPU is visible: STSConfig accepts the name (it does not ask the machine), the
    # forecast asks before it puts the SAE there (was a raw CUDA error from inside load_sae)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(STSConfigError, match="STSConfig.device='cuda'.*no CUDA GPU is visible.*use 'cpu'"):
        forecast(model, tokenizer, sae(), domain_texts("law", 30), targets(), config(device="cuda"))


def test_context_too_short_for_any_demonstration_is_refused(tokenizer):
    import transformers as tf

    short = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=14, pad_token_id=0, bos_token_id=1,
                                               eos_token_id=2))
    with pytest.raises(STSConfigError, match=r"context \(14 tokens\) is no longer than a query.*Lower max_query_"):
        forecast(short, tokenizer, sae(), domain_texts("law", 30), targets(), config(max_query_tokens=64))
    # a context that fits the queries but hardly any demonstration: refused too, every shift would be 0
    with pytest.raises(STSInputError, match="No in-context demonstration fits before any query"):
        forecast(short, tokenizer, sae(), [" ".join(domain_texts("law", 4, length=12))] * 30, targets(),
                 config(max_query_tokens=13))


def test_nan_in_the_sae_weights_is_refused_by_name(model, tokenizer):
    broken = sae()
    with torch.no_grad():
        broken.W_enc[3, 5] = float("nan")
    with pytest.raises(STSInputError, match=r"\['W_enc'\] hold NaN or inf"):
        forecast(model, tokenizer, broken, domain_texts("law", 30), targets(), config())


def test_one_text_domain_is_flagged_not_ranked_last_silently(model, tokenizer):
    with pytest.warns(STSDataWarning, match="'single' has one text"):
        result = forecast(model, tokenizer, sae(), domain_texts("law", 30),
                          targets(single=[" ".join(domain_texts("food", 3))]), config())
    assert result.domains["single"].scores["sts_icl"] is None
    assert result.domains["single"].scores["sts_act"] > 0
    assert result.ranked()[-1] == ("single", None)
    assert "n/a" in result.table()
    assert all(result.domains[d].scores["sts_icl"] is not None for d in ("code", "chem"))
    # one text beside blank rows (a file whose text cell is mostly empty): no demonstration either; was an
    # STS_icl of 0 from an empty context, unsaid, ranked above the one-text domain
    one = " ".join(domain_texts("food", 3))
    with pytest.warns(STSDataWarning, match="'padded' has one text that can be a demonstration"):
        result = forecast(model, tokenizer, sae(), domain_texts("law", 30), targets(padded=[one, "", "  "]), config())
    assert result.domains["padded"].scores["sts_icl"] is None


def test_targets_without_answers_rank_by_sts_act_and_say_why(model, tokenizer):
    """GRPO eval sets hold prompts only: with every target so, STS_icl was computed for none, and the forecast's
    table (printed at train start) raised "Variant 'sts_icl' was not computed (compute_icl=False?)", which stopped
    the run; the warning said each domain had "one text" and to add texts, not answers."""
    def prompts(domain):
        return [[{"role": "user", "content": t}] for t in domain_texts(domain, n=8)]

    with pytest.warns(STSDataWarning) as caught:
        result = forecast(model, tokenizer, sae(), domain_texts("law", 30), {"code": prompts("code"),
                                                                             "chem": prompts("chem")}, config())
    messages = [str(w.message) for w in caught]
    assert any("'code' has no text with an answer" in m and "its 8 rows" in m for m in messages)
    assert any("ranked by STS_act" in m for m in messages)
    assert result.ranking == "sts_act" and "ranked by STS_act" in result.table()
    assert [name for name, _ in result.ranked()] == sorted(result.domains, key=lambda d: -result.score(d, "sts_act"))


def test_descriptive_hook_name_needs_the_layer_and_is_accepted_with_it(model, tokenizer):
    descriptive = sae(hook_name="resid-after-block-one")
    with pytest.raises(STSConfigError, match=r"'resid-after-block-one' names no decoder layer.*STSConfig\(layer="):
        forecast(model, tokenizer, descriptive, domain_texts("law", 30), targets(), config())
    result = forecast(model, tokenizer, descriptive, domain_texts("law", 30), targets(), config(layer=1))
    reference = forecast(model, tokenizer, sae(), domain_texts("law", 30), targets(), config())
    assert result.shifted_latents == reference.shifted_latents


def test_a_hook_that_is_not_the_residual_stream_is_refused_even_with_a_layer(model, tokenizer):
    with pytest.raises(STSInputError, match="not the residual stream"):
        forecast(model, tokenizer, sae(hook_name="blocks.1.hook_mlp_out"), domain_texts("law", 30), targets(),
                 config(layer=1))


def test_healthy_forecast_raises_no_data_warning(model, tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error", STSDataWarning)
        result = forecast(model, tokenizer, sae(), domain_texts("law", 30), targets(), config())
    assert len(result.shifted_latents) == 12


@pytest.mark.parametrize("train", [["law"], ["law court judge"], domain_texts("law", 1, length=6)])
def test_a_training_set_too_small_to_measure_is_refused_by_name(model, tokenizer, train):
    with pytest.raises(STSInputError, match=r"The training data 'train' has only \d+ tokens \(of 300 asked for\), "
                                            "fewer than one query of at least 16; add texts to it"):
        forecast(model, tokenizer, sae(), train, targets(), config())


def test_a_one_text_training_set_is_flagged_as_its_own_demonstration(model, tokenizer):
    with pytest.warns(STSDataWarning, match=r"The training data 'train' has one text .* its own demonstration.*"
                                            r"demonstrations=\[\.\.\.\]"):
        result = forecast(model, tokenizer, sae(), [" ".join(domain_texts("law", 4))], targets(), config())
    assert result.shift_queries == 1 and result.shifted_latents  # kept: the forecast is still made
    # with demonstrations from elsewhere, the one text is no demonstration of itself: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", STSDataWarning)
        forecast(model, tokenizer, sae(), [" ".join(domain_texts("law", 4))], targets(), config(),
                 demonstrations=domain_texts("law", 10, seed=5))


def test_blank_texts_are_never_drawn_as_demonstrations(model, tokenizer):
    # a data set with blank rows (wikitext has them): a blank is skipped as a query, and as a demonstration too
    from sts_callback.core.data import load_corpus, load_domains
    from sts_callback.pipelines.forecast import ForecastSetup, plan_inputs

    setup = ForecastSetup.create(model, tokenizer, sae(), config())
    law, food = domain_texts("law", 30), domain_texts("food", 20)
    for blanks in (300, 3000):
        plan = plan_inputs(setup.builder, setup.config, load_corpus(law + ["  \n "] * blanks, "train"),
                           load_domains({"food": food + [""] * 200}))
        assert all(p.context != p.base for p in plan.shift_pairs)  # each query follows a demonstration
        assert all(p.context != p.base for p in plan.domains["food"].pairs)
    # a domain of conversations (each read as one text) still demonstrates
    chats = [[{"role": "user", "content": a}, {"role": "assistant", "content": b}] for a, b in zip(food, law)]
    plan = plan_inputs(setup.builder, setup.config, load_corpus(law, "train"), load_domains({"chat": chats}))
    assert all(p.context != p.base for p in plan.domains["chat"].pairs)


def test_copies_in_a_held_out_set_are_measured_once_and_said_to_be(model, tokenizer):
    # 30 copies counted as 30 texts would make the loss change's interval look ~5x narrower than one text gives
    from sts_callback.core.data import load_corpus
    from sts_callback.pipelines.forecast import ForecastSetup
    from sts_callback.pipelines.monitor import Monitor

    setup = ForecastSetup.create(model, tokenizer, sae(), config())
    text, other = " ".join(domain_texts("law", 4)), domain_texts("food", 1)[0]
    with pytest.warns(STSDataWarning, match=r"'x': 29 of the 31 texts .* exact copies"):
        sequences, tokens = Monitor.sample_sequences(load_corpus([text] * 30 + [other], name="x"), setup, 10_000,
                                                     "seed")
    assert len(sequences) == 2 and tokens == sum(sum(counted) for _, counted in sequences)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # distinct texts: no warning
        assert len(Monitor.sample_sequences(load_corpus(domain_texts("law", 5), name="y"), setup, 10_000, "s")[0]) == 5


def test_a_mostly_dead_sae_is_named_not_answered_with_more_tokens(model, tokenizer):
    mostly_dead = sae()
    with torch.no_grad():
        mostly_dead.b_enc[:60] = -1e6  # 60 of 64 latents can never fire
    with pytest.warns(STSDataWarning, match=r"Only \d of the SAE's 64 latents fire on the training data at all"):
        forecast(model, tokenizer, mostly_dead, domain_texts("law", 60), targets(), config())


def test_a_training_set_of_copies_is_its_own_demonstration_and_said_to_be(model, tokenizer):
    text = " ".join(domain_texts("law", 4))
    with pytest.warns(STSDataWarning, match="follow only copies of themselves"):
        forecast(model, tokenizer, sae(), [text] * 30, targets(), config())


@pytest.mark.parametrize("me", [0, 1])
def test_train_start_data_warnings_are_said_by_the_main_process_alone(model, tokenizer, monkeypatch, me):
    """Under torchrun every rank prepares the same samples: each warned, so a warning came once per process."""
    from test_progress_totals import as_main_of

    from sts_callback.core.data import load_corpus
    from sts_callback.pipelines.forecast import ForecastSetup
    from sts_callback.pipelines.monitor import Monitor

    as_main_of(monkeypatch, 2, me)
    mostly_dead = sae()
    with torch.no_grad():
        mostly_dead.b_enc[:60] = -1e6  # 60 of 64 latents can never fire: "Only N SAE latents moved"
    setup = ForecastSetup.create(model, tokenizer, sae(), config())
    text, other = " ".join(domain_texts("law", 4)), domain_texts("food", 1)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = forecast(model, tokenizer, mostly_dead, domain_texts("law", 60),
                          targets(single=[" ".join(domain_texts("food", 3))]), config())
        sequences, tokens = Monitor.sample_sequences(load_corpus([text] * 30 + [other], name="x"), setup, 10_000,
                                                     "seed")
    said = [str(w.message) for w in caught if issubclass(w.category, STSDataWarning)]
    # what is measured is the same on every rank
    assert len(sequences) == 2 and tokens == sum(sum(counted) for _, counted in sequences)
    assert result.domains["single"].scores["sts_icl"] is None
    if me == 1:
        assert said == []
    else:
        assert any("'single' has one text" in m for m in said) and any("SAE latents moved" in m for m in said)
        [copies] = [m for m in said if "exact copies" in m]
        assert "its loss change" not in copies and "held-out set's loss change" in copies


@pytest.mark.parametrize("me", [0, 1])
def test_data_and_setup_warnings_that_every_rank_meets_alike_are_said_by_the_main_process(tmp_path, monkeypatch,
                                                                                           me):
    from test_progress_totals import as_main_of

    from sts_callback.core.data import MANY_LINES, load_corpus

    as_main_of(monkeypatch, 2, me)
    lines = tmp_path / "one_text_per_line.txt"
    lines.write_text("\n".join(domain_texts("law", MANY_LINES)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_corpus(str(lines))  # read as one text: every rank reads the same file
    said = [str(w.message) for w in caught if issubclass(w.category, STSDataWarning)]
    assert len(said) == (1 if me == 0 else 0) and (me or "no blank line" in said[0])


def test_a_tokenizer_longer_than_the_models_embedding_is_named_with_the_fix(model):
    """Tokens added to the tokenizer without resize_token_embeddings: torch's bare IndexError before (and the
    callback's note blamed memory or the SAE)."""
    grown = make_tokenizer()
    added = [f"newword{i}" for i in range(40)]
    grown.add_tokens(added)
    texts = [f"{t} {added[30 + i % 10]}" for i, t in enumerate(domain_texts("law", 20))]  # ids 128-137
    with pytest.raises(STSInputError, match=r"input embedding has 128 rows.*resize_token_embeddings\(len\(tokenizer"):
        forecast(model, grown, sae(), texts, {"chem": domain_texts("chem", 10)}, config())


def test_a_token_beyond_the_embedding_in_held_out_texts_or_choices_is_named_too(model):
    """The held-out loss and multiple-choice scoring ran no such check: a bare IndexError at train start (a
    device assert on a GPU) when the forecast's sample had missed the added token."""
    from sts_callback.core.heldout import sequence_nll
    from sts_callback.core.multiple_choice import choice_scores

    grown = make_tokenizer()
    grown.add_tokens([f"newword{i}" for i in range(40)])
    ids = list(grown("law court newword39")["input_ids"])
    assert ids[-1] >= 128
    with pytest.raises(STSInputError, match=r"input embedding has 128 rows.*resize_token_embeddings"):
        sequence_nll(model, [(ids, [True] * (len(ids) - 1))], 0, 4)
    with pytest.raises(STSInputError, match=r"input embedding has 128 rows.*resize_token_embeddings"):
        choice_scores(model, grown, {"question": "law court ?", "choices": ["newword39", "judge"], "answer": 1})


def test_a_target_domain_named_train_keeps_its_own_contexts(model, tokenizer):
    """The training set's top contexts were kept under the key "train": a domain of that name (a train.jsonl
    target) shared its reservoir and the forecast failed with an IndexError."""
    result = forecast(model, tokenizer, sae(), domain_texts("law", 30), targets(train=domain_texts("food", 10)),
                      config(top_contexts=3))
    assert "train" in result.domains
    sources = {entry["source"] for entries in result.latent_contexts.values() for entry in entries}
    assert "train" in sources and sources <= {"train", *result.domains}
