"""The forecast against a direct dense computation, position matching, masking, determinism."""

import json

import pytest
import torch
from tiny import TinySAE, domain_texts, make_model, make_tokenizer

from sts_callback import STSConfig, STSConfigError, STSInputError, STSNumericalError, forecast
from sts_callback.core.data import Corpus, load_corpus, load_domains
from sts_callback.pipelines.forecast import Forecast, ForecastSetup, plan_inputs

LAYER = 1


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model():
    return make_model("llama").double()


def small_config(**overrides):
    values = dict(n_shifted=12, shift_tokens=300, domain_tokens=150, batch_size=4, n_domain_demonstrations=3)
    values.update(overrides)
    return STSConfig(**values)


def targets():
    return {d: domain_texts(d, n=15) for d in ("code", "chem", "food")}


def dense_latents(model, sae, ids):
    """Reference: full forward of one unpadded sequence, hidden_states[L+1], all latents kept densely."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        resid = out.hidden_states[LAYER + 1][0]
        return resid, sae.encode(resid)


def test_scores_equal_dense_computation(model, tokenizer):
    sae = TinySAE(32, 64, hook_name=f"blocks.{LAYER}.hook_resid_post").double()
    config = small_config()
    train = domain_texts("law", n=40)
    result = forecast(model, tokenizer, sae, train, targets(), config)

    setup = ForecastSetup.create(model, tokenizer, sae, config)
    plan = plan_inputs(setup.builder, config, load_corpus(train, "train"), load_domains(targets()))

    def matched(pair):
        """Latents and residuals at the counted query tokens, without and with context."""
        keep = torch.tensor(pair.counted)
        rb, hb = dense_latents(model, sae, pair.base)
        rc, hc = dense_latents(model, sae, pair.context)
        n = pair.n_query
        return hb[-n:][keep], hc[-n:][keep], rb[-n:][keep], rc[-n:][keep]

    rows = [matched(p) for p in plan.shift_pairs]
    hb = torch.cat([r[0] for r in rows]); hc = torch.cat([r[1] for r in rows])
    rb = torch.cat([r[2] for r in rows]); rc = torch.cat([r[3] for r in rows])
    shift = ((hc - hb) ** 2).mean(0)
    top = torch.sort(shift, descending=True, stable=True).indices[: config.n_shifted]
    assert result.shifted_latents == top.tolist()
    torch.testing.assert_close(torch.tensor(result.shift_values, dtype=torch.float64), shift[top], rtol=1e-6, atol=0)
    raw_top = torch.sort(((rc - rb) ** 2).mean(0), descending=True, stable=True).indices[: config.n_shifted]
    assert result.shift_tokens == hb.shape[0]
    # the bounded reservoir holds each shifted latent's largest activations (no second pass)
    for latent in result.shifted_latents:
        train_contexts = [c for c in result.latent_contexts[str(latent)] if c["source"] == "train"]
        dense_top = torch.topk(hb[:, latent], min(config.top_contexts, hb.shape[0])).values
        dense_top = dense_top[dense_top > 0]
        assert [c["value"] for c in train_contexts] == pytest.approx(dense_top.tolist(), rel=1e-6)
        assert all(c["token"].strip() for c in train_contexts)

    for name, domain in plan.domains.items():
        drows = [matched(p) for p in domain.pairs]
        dhb = torch.cat([r[0] for r in drows]); dhc = torch.cat([r[1] for r in drows])
        drb = torch.cat([r[2] for r in drows]); drc = torch.cat([r[3] for r in drows])
        expected = {
            "sts_act": dhb[:, top].sum(1).mean(),
            "sts_icl": ((dhc[:, top] - dhb[:, top]) ** 2).sum(1).mean(),
            "sts_sq": (dhb[:, top] ** 2).mean(1).mean(),
            "raw_act": drb[:, raw_top].sum(1).mean(),
            "raw_icl": ((drc[:, raw_top] - drb[:, raw_top]) ** 2).sum(1).mean(),
            "raw_sq": (drb[:, raw_top] ** 2).mean(1).mean(),
        }
        for variant, value in expected.items():
            assert result.domains[name].scores[variant] == pytest.approx(float(value), rel=1e-6), (name, variant)
        assert result.domains[name].tokens == dhb.shape[0]


def test_an_offline_forecast_records_the_saes_fit_and_warns_when_it_reads_nothing(model, tokenizer, tmp_path):
    """forecast() / sts forecast / sts gate with an SAE for another model printed a confident table: only the
    callback checked the SAE's fit. The forecast now measures it on the training rows it encodes anyway."""
    import warnings

    from tiny import ExactSAE

    from sts_callback import STSDataWarning

    train = domain_texts("law", n=40)
    with warnings.catch_warnings():
        warnings.simplefilter("error", STSDataWarning)  # a lossless SAE fits: nothing to say
        exact = forecast(model, tokenizer, ExactSAE(32, hook_name=f"blocks.{LAYER}.hook_resid_post").double(), train,
                         targets(), small_config())
    fit = exact.settings["sae_fit"]
    assert fit["fvu"] < 1e-10 and fit["tokens"] == exact.shift_tokens and fit["l0"] > 0
    with pytest.warns(STSDataWarning, match=r"poorly: fraction of variance unexplained .* on the training data"):
        poor = forecast(model, tokenizer, ExactSAE(32, hook_name=f"blocks.{LAYER}.hook_resid_post",
                                                   noise=1.0).double(), train, targets(), small_config())
    assert poor.settings["sae_fit"]["fvu"] > 0.6
    assert Forecast.load(poor.save(tmp_path / "f.json")).settings["sae_fit"] == poor.settings["sae_fit"]


def test_position_matching_compares_only_query_tokens(tokenizer):
    """A model whose residual at a position depends only on that position's token: any shift is zero.

    The reference code's row-by-row comparison of misaligned tokens would report large shifts here.
    """
    model = make_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    sae = TinySAE(32, 64, hook_name=f"blocks.{LAYER}.hook_resid_post")
    # every shift is exactly zero, so the forecast is refused rather than ranking latents 0..N-1 by index
    with pytest.raises(STSNumericalError, match="moved no SAE latent"):
        forecast(model, tokenizer, sae, domain_texts("law", 30), targets(), small_config())


def test_changing_demonstrations_changes_only_the_context(model, tokenizer):
    sae = TinySAE(32, 64, hook_name=f"blocks.{LAYER}.hook_resid_post").double()
    train = load_corpus(domain_texts("law", 40), "train")
    setup = ForecastSetup.create(model, tokenizer, sae, small_config())
    plans = [plan_inputs(setup.builder, small_config(), train, load_domains(targets()), demonstrations=demos)
             for demos in (None, load_corpus(domain_texts("food", 10), "demos"))]
    for a, b in zip(plans[0].shift_pairs, plans[1].shift_pairs):
        assert a.base == b.base and a.n_query == b.n_query and a.counted == b.counted
        assert a.context[-a.n_query:] == b.context[-b.n_query:] == a.base[-a.n_query:]
        assert a.context[: -a.n_query] != b.context[: -b.n_query]
    results = [forecast(model, tokenizer, sae, train, targets(), small_config(), demonstrations=d)
               for d in (None, domain_texts("food", 10))]
    assert results[0].shift_tokens == results[1].shift_tokens
    assert results[0].shift_values != results[1].shift_values
    # scores that do not involve demonstrations of the training data are unchanged for the same latents
    assert results[0].domains["code"].tokens == results[1].domains["code"].tokens


def test_padding_and_batching_do_not_change_statistics(model, tokenizer):
    sae = TinySAE(32, 64, hook_name=f"blocks.{LAYER}.hook_resid_post").double()
    runs = [forecast(model, tokenizer, sae, domain_texts("law", 40), targets(), small_config(batch_size=b))
            for b in (1, 3, 16)]
    for other in runs[1:]:
        assert other.shifted_latents == runs[0].shifted_latents
        for name in runs[0].domains:
            for variant, value in runs[0].domains[name].scores.items():
                assert other.domains[name].scores[variant] == pytest.approx(value, rel=1e-9)


def test_special_tokens_and_padding_never_counted(model, tokenizer):
    sae = TinySAE(32, 64, hook_name=f"blocks.{LAYER}.hook_resid_post").double()
    texts = ["law court <eos> judge .", "<eos> <eos> contract"]
    setup = ForecastSetup.create(model, tokenizer, sae, small_config(compute_icl=False, ranking="sts_act"))
    train = texts * 4  # 20 tokens: a training set below 16 is refused
    plan = plan_inputs(setup.builder, setup.config, load_corpus(train), load_domains({"d": texts * 10}))
    special = set(tokenizer.all_special_ids)
    for ids, counted in plan.domains["d"].singles:
        assert ids[0] == tokenizer.bos_token_id and not counted[0]
        assert all(not c for tok, c in zip(ids, counted) if tok in special)
    assert plan.domains["d"].tokens == 10 * (4 + 1)  # "law court judge ." and "contract"
    result = forecast(model, tokenizer, sae, train, {"d": texts * 10},
                      small_config(compute_icl=False, ranking="sts_act", batch_size=16))
    assert result.domains["d"].tokens == 50
    included = STSConfig(**{**small_config(compute_icl=False, ranking="sts_act").to_dict(),
                            "exclude_special_tokens": False})
    assert forecast(model, tokenizer, sae, train, {"d": texts * 10}, included).domains["d"].tokens == 10 * (5 + 3)


def test_same_seed_same_result_and_seed_matters(model, tokenizer):
    sae = TinySAE(32, 64, hook_name=f"blocks.{LAYER}.hook_resid_post").double()
    train = domain_texts("law", 60)
    a = forecast(model, tokenizer, sae, train, targets(), small_config(seed=3))
    b = forecast(model, tokenizer, sae, train, targets(), small_config(seed=3))
    c = forecast(model, tokenizer, sae, train, targets(), small_config(seed=4))
    assert a.shifted_latents == b.shifted_latents and a.shift_values == b.shift_values
    assert {n: d.scores for n, d in a.domains.items()} == {n: d.scores for n, d in b.domains.items()}
    assert a.shift_values != c.shift_values


def test_forecast_json_round_trip_and_table(model, tokenizer, tmp_path):
    sae = TinySAE(32, 64, hook_name=f"blocks.{LAYER}.hook_resid_post").double()
    result = forecast(model, tokenizer, sae, domain_texts("law", 30), targets(), small_config())
    path = result.save(tmp_path / "forecast.json")
    loaded = Forecast.load(path)
    assert loaded.to_dict() == json.loads(json.dumps(result.to_dict()))
    assert loaded.ranked() == result.ranked()
    table = str(loaded)
    lines = table.splitlines()
    ranked_names = [name for name, _ in result.ranked()]
    assert [line.split()[1] for line in lines[3:]] == ranked_names
    assert "STS_icl" in lines[1] and "STS_act" in lines[1]
    assert loaded.settings["layer"] == LAYER and loaded.settings["sae"]["d_sae"] == 64


def test_input_kinds(model, tokenizer, tmp_path):
    """Strings, chat conversations, TRL records, a datasets.Dataset and a JSONL path all work."""
    from datasets import Dataset

    sae = TinySAE(32, 64, hook_name=f"blocks.{LAYER}.hook_resid_post").double()
    texts = domain_texts("law", 30)
    chats = [[{"role": "user", "content": t}, {"role": "assistant", "content": u}] for t, u in zip(texts, texts[1:])]
    records = [{"prompt": t, "completion": u} for t, u in zip(texts, texts[1:])]
    dpo = [{"prompt": t, "chosen": u, "rejected": "no"} for t, u in zip(texts, texts[1:])]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"messages": c}) for c in chats))
    for train in (texts, chats, records, dpo, Dataset.from_dict({"text": texts}),
                  Dataset.from_dict({"messages": chats}), str(path)):
        result = forecast(model, tokenizer, sae, train, {"chem": Dataset.from_dict({"text": domain_texts("chem")})},
                          small_config())
        assert result.shift_tokens > 0 and result.domains["chem"].scores["sts_icl"] > 0


def test_chat_queries_are_position_matched(model, tokenizer):
    texts = domain_texts("law", 20)
    chats = [[{"role": "user", "content": t}, {"role": "assistant", "content": u}] for t, u in zip(texts, texts[1:])]
    sae = TinySAE(32, 64, hook_name=f"blocks.{LAYER}.hook_resid_post")
    setup = ForecastSetup.create(model, tokenizer, sae, small_config())
    plan = plan_inputs(setup.builder, setup.config, load_corpus(chats), load_domains(targets()))
    user, end = tokenizer.convert_tokens_to_ids(["<|user|>", "<|end|>"])
    for pair in plan.shift_pairs:
        query = pair.base[-pair.n_query:]
        assert pair.context[-pair.n_query:] == query
        assert query[0] == user and query[-1] == end  # the query is exactly the user turn
        assert pair.context.count(tokenizer.convert_tokens_to_ids("<|assistant|>")) == 2
        assert pair.context[0] == tokenizer.bos_token_id and pair.context.count(tokenizer.bos_token_id) == 1


def test_long_contexts_lose_demonstration_tokens_from_the_left(model, tokenizer):
    sae = TinySAE(32, 64, hook_name=f"blocks.{LAYER}.hook_resid_post")
    long_texts = domain_texts("law", 20, length=60)
    config = small_config(max_length=48, max_query_tokens=20)
    setup = ForecastSetup.create(model, tokenizer, sae, config)
    plan = plan_inputs(setup.builder, config, load_corpus(long_texts), load_domains(targets()))
    for pair in plan.shift_pairs:
        assert len(pair.context) <= 48
        assert pair.context[0] == tokenizer.bos_token_id
        assert pair.context[-pair.n_query:] == pair.base[-pair.n_query:]
        assert pair.n_query == min(20, len(pair.base) - 1)


def test_a_conversation_longer_than_the_sequence_limit_keeps_its_end_within_it(model, tokenizer):
    """A two-turn chat of ~45 tokens under a 32-token limit went into the model whole (its earlier turn was never
    cut): past a learned-position model's table, an IndexError at train start; past a RoPE model's, silently."""
    sae = TinySAE(32, 64, hook_name=f"blocks.{LAYER}.hook_resid_post")
    config = small_config(max_length=32, max_query_tokens=16)
    setup = ForecastSetup.create(model, tokenizer, sae, config)
    asks, answers = domain_texts("law", 30, length=40), domain_texts("food", 30, length=40)
    domains = load_domains({"chat": [[{"role": "user", "content": a}, {"role": "assistant", "content": b}]
                                     for a, b in zip(asks, answers)]})  # a target's conversation is read whole
    chats = domains["chat"]
    plan = plan_inputs(setup.builder, config, load_corpus(domain_texts("chem", 20, length=40)), domains)
    pairs = [*plan.shift_pairs, *(plan.domains["chat"].pairs or [])]
    assert plan.domains["chat"].pairs and all(len(p.base) <= 32 and len(p.context) <= 32 for p in pairs)
    for i in range(len(chats)):  # the held-out loss's sequences too
        ids, counted = setup.builder.single(chats[i])
        assert len(ids) <= 32 and len(counted) == len(ids) and any(counted)
        assert ids[0] == tokenizer.bos_token_id  # the special start kept where the earlier turn was cut


def test_sampling_respects_token_budgets(model, tokenizer):
    sae = TinySAE(32, 64, hook_name=f"blocks.{LAYER}.hook_resid_post")
    result = forecast(model, tokenizer, sae, domain_texts("law", 200), {"chem": domain_texts("chem", 200)},
                      small_config(shift_tokens=100, domain_tokens=60))
    assert 100 <= result.shift_tokens < 100 + 20
    assert 60 <= result.domains["chem"].tokens < 60 + 20


def test_truncated_forward_skips_later_layers(model, tokenizer):
    sae = TinySAE(32, 64, hook_name="blocks.0.hook_resid_post").double()
    calls = []
    handle = model.model.layers[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        truncated = forecast(model, tokenizer, sae, domain_texts("law", 30), targets(), small_config())
        assert calls == []
        full = forecast(model, tokenizer, sae, domain_texts("law", 30), targets(), small_config(truncate_forward=False))
        assert calls
    finally:
        handle.remove()
    assert truncated.shifted_latents == full.shifted_latents
    for name in truncated.domains:
        for variant, value in truncated.domains[name].scores.items():
            assert full.domains[name].scores[variant] == pytest.approx(value, rel=1e-9)
    assert truncated.settings["truncated_forward"] and not full.settings["truncated_forward"]


def test_model_is_returned_to_its_training_mode(tokenizer):
    model = make_model("llama")
    model.train()
    sae = TinySAE(32, 64, hook_name=f"blocks.{LAYER}.hook_resid_post")
    forecast(model, tokenizer, sae, domain_texts("law", 30), targets(), small_config())
    assert model.training


class CountingRows(list):
    """A training set's rows that count how many are read (a large dataset whose rows are costly to read)."""

    reads = 0

    def __getitem__(self, index):
        CountingRows.reads += 1
        return super().__getitem__(index)


def reference_plan(builder, config, train, domains):
    """The forecast's draws as written before 2026-12-05: the demonstration pool listed whole, and per query the
    list of every other row (quadratic in a large set); the seeded draws must not change."""
    import random

    from sts_callback.core.data import sample_within_budget

    rng = random.Random(config.seed)
    queries, _ = sample_within_budget(train, builder, config.shift_tokens, rng)
    pool = [i for i in range(len(train)) if train[i].can_demonstrate]
    shift = [builder.pair(train[q], [train[i] for i in rng.sample([i for i in pool if i != q],
                                                                  min(config.n_demonstrations, len(pool) - 1))])
             for q in queries]
    out = {}
    for name, corpus in domains.items():
        domain_rng = random.Random(f"{config.seed}:{name}")
        indices, _ = sample_within_budget(corpus, builder, config.domain_tokens, domain_rng)
        out[name] = [builder.pair(corpus[i], [corpus[j] for j in domain_rng.sample(
            [j for j in range(len(corpus)) if j != i], min(config.n_domain_demonstrations, len(corpus) - 1))])
            for i in indices]
    return shift, out


@pytest.mark.parametrize("mixed", [False, True])
def test_a_large_training_set_is_read_only_where_drawn_and_the_draws_are_unchanged(model, tokenizer, mixed):
    """Train start read every row of the training set to list the demonstration pool, and built a list of every
    other row for each query: 30-110 s at 1M rows for a few thousand tokens. Rows are now read where drawn; a set
    with rows that cannot demonstrate (prompt-only) is drawn from again among those that can, as before."""
    sae = TinySAE(32, 64, hook_name=f"blocks.{LAYER}.hook_resid_post").double()
    config = small_config()
    setup = ForecastSetup.create(model, tokenizer, sae, config)
    texts = domain_texts("law", n=40)
    rows = [{"prompt": t} if mixed and i % 3 == 0 else {"text": t} for i, t in enumerate(texts)]
    train, domains = load_corpus(rows, "train"), load_domains(targets())
    plan = plan_inputs(setup.builder, config, train, domains)
    shift, domain_pairs = reference_plan(setup.builder, config, train, domains)
    assert [(p.base, p.context) for p in plan.shift_pairs] == [(p.base, p.context) for p in shift]
    for name, pairs in domain_pairs.items():
        assert [(p.base, p.context) for p in plan.domains[name].pairs] == [(p.base, p.context) for p in pairs]

    if mixed:
        return
    CountingRows.reads = 0
    large = Corpus("train", CountingRows({"text": texts[i % 40]} for i in range(200_000)))
    plan_inputs(setup.builder, config, large, domains)
    assert 0 < CountingRows.reads < 200  # the queries and their demonstrations, not 200,000 rows


def test_a_vlms_processor_is_read_as_its_tokenizer_with_the_processors_chat_template():
    """forecast(model, processor, ...): what a VLM user holds (and what STSCallback accepts as processing_class)."""
    from tiny import CHAT_TEMPLATE, make_processor

    from sts_callback import gate_mixture

    processor = make_processor(make_tokenizer(chat_template=False), CHAT_TEMPLATE)  # the template on the processor
    model, sae = make_model("llava"), TinySAE(32, 64, hook_name="model.language_model.layers.1")
    texts = domain_texts("law", 30)
    chats = [[{"role": "user", "content": a}, {"role": "assistant", "content": b}] for a, b in zip(texts, texts[1:])]
    config = dict(n_shifted=8, shift_tokens=120, domain_tokens=80, n_domain_demonstrations=2)
    result = forecast(model, processor, sae, chats, {d: domain_texts(d, 20) for d in ("law", "food")}, config)
    assert set(result.domains) == {"law", "food"} and result.shift_queries > 0
    decision = gate_mixture(model, processor, sae, {"law": chats}, {"food": domain_texts("food", 20)}, "food",
                            config=config)
    assert "law" in decision.candidates


def test_offline_entries_refuse_what_the_callback_refuses_before_any_work(tmp_path):
    """The same inputs, the same answers: a calibration reading STS_icl under compute_icl=False before the forecast
    runs; a DatasetDict of preference pairs naming the split; plain-text pairs' free-text `tools` column left alone."""
    import datasets

    from sts_callback.pipelines.preference import preference_forecast, tokenize_preference

    model, tokenizer, sae = make_model("llama"), make_tokenizer(), TinySAE(32, 64, hook_name="blocks.1.hook_resid_post")
    encoded = []
    sae.encode = lambda x, encode=sae.encode: encoded.append(len(x)) or encode(x)
    with pytest.raises(STSConfigError, match=r"compute_icl=False\) does not compute"):
        forecast(model, tokenizer, sae, domain_texts("law", 10), ["legal"], {"compute_icl": False, "ranking": "sts_act"},
                 calibration="gemma3-270m-lora")
    assert not [n for n in encoded if n > 1]  # no forecast pass ran (load_sae checks encode on one row)
    pairs = [{"prompt": "law", "chosen": "court judge", "rejected": "cook bake", "tools": "hammer, saw"}]
    with pytest.raises(STSInputError, match=r"DatasetDict.*pick a split"):
        preference_forecast(model, tokenizer, sae, datasets.DatasetDict({"train": datasets.Dataset.from_list(pairs)}),
                            ["legal"], {"n_shifted": 8})
    from sts_callback.pipelines.forecast import ForecastSetup

    setup = ForecastSetup.create(model, tokenizer, sae, STSConfig(n_shifted=8))
    assert tokenize_preference(setup.builder, pairs[0], 0).chosen[1]  # read: the tools text is no chat template's


def test_the_cli_loads_a_vlm_folder_with_its_processor(tmp_path):
    from tiny import CHAT_TEMPLATE, make_processor

    from sts_callback.tools.cli import load_model

    make_model("llava").save_pretrained(tmp_path / "vlm")
    make_processor(make_tokenizer(chat_template=False), CHAT_TEMPLATE).save_pretrained(tmp_path / "vlm")
    model, processor = load_model(str(tmp_path / "vlm"))
    assert type(model).__name__ == "LlavaForConditionalGeneration" and processor.chat_template == CHAT_TEMPLATE


def test_equal_top_activations_are_listed_in_text_order_however_merged():
    """Two processes merged the reservoirs in another order than one: equal activations swapped places in
    forecast.json's latent contexts, the only difference between the two files."""
    import torch

    from sts_callback.core.stats import TopActivations

    def reservoir(sequences):
        found = TopActivations(width=1, k=4)
        found.update(torch.tensor([[2.0]] * len(sequences)), torch.tensor(sequences), torch.tensor([0] * len(sequences)))
        return found

    one = reservoir([0, 1, 2, 3]).top(0)
    merged = reservoir([2, 3]).merge(reservoir([0, 1])).top(0)
    assert one == merged == [(2.0, 0, 0), (2.0, 1, 0), (2.0, 2, 0), (2.0, 3, 0)]
