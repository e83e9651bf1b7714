"""Reading a trainer's train dataset back as examples, raw or tokenized as TRL leaves it."""

import copy

import pytest
from datasets import Dataset
from tiny import make_tokenizer

from sts_callback import STSDataWarning, STSInputError
from sts_callback.core.data import example_from_record
from sts_callback.integrations.training_data import corpus_from_training_dataset, probe_corpus


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_raw_trl_shapes():
    assert example_from_record({"prompt": "p", "chosen": "good", "rejected": "bad"}).answer == "good"
    assert example_from_record({"prompt": "p", "completion": "c"}).answer == "c"
    chat = example_from_record({"prompt": [{"role": "user", "content": "q"}],
                                "chosen": [{"role": "assistant", "content": "a"}], "rejected": []})
    assert chat.is_chat and chat.answer == "a"
    grpo = example_from_record({"prompt": "p"})
    assert not grpo.can_demonstrate
    text = example_from_record({"text": "t"})
    assert text.plain_text and text.can_demonstrate


def test_tokenized_dpo_columns_use_chosen(tokenizer):
    ids = lambda s: tokenizer(s)["input_ids"]  # noqa: E731
    data = Dataset.from_dict({"prompt_ids": [ids("law court")], "chosen_ids": [ids("judge .")[1:]],
                              "rejected_ids": [ids("cook")[1:]]})
    example = corpus_from_training_dataset(data, tokenizer)[0]
    assert example.prompt == "law court" and example.answer == " judge ."


def test_tokenized_sft_with_completion_mask(tokenizer):
    prompt, completion = tokenizer("law court")["input_ids"], tokenizer("judge .")["input_ids"][1:]
    data = Dataset.from_dict({"input_ids": [prompt + completion],
                              "completion_mask": [[0] * len(prompt) + [1] * len(completion)]})
    example = corpus_from_training_dataset(data, tokenizer)[0]
    assert (example.prompt, example.answer) == ("law court", " judge .")
    plain = corpus_from_training_dataset(Dataset.from_dict({"input_ids": [prompt]}), tokenizer)[0]
    assert plain.plain_text and plain.prompt == "law court"


def test_labels_masking_the_prompt_split_it_as_trl_and_hand_tokenized_sets_leave_it(tokenizer):
    prompt, completion = tokenizer("law court")["input_ids"], tokenizer("judge .")["input_ids"][1:]
    data = Dataset.from_dict({"input_ids": [prompt + completion], "labels": [[-100] * len(prompt) + completion]})
    example = corpus_from_training_dataset(data, tokenizer)[0]
    assert (example.prompt, example.answer) == ("law court", " judge .")
    every_token = Dataset.from_dict({"input_ids": [prompt + completion], "labels": [prompt + completion]})
    plain = corpus_from_training_dataset(every_token, tokenizer)[0]  # causal LM labels: a plain text
    assert plain.plain_text and plain.prompt == "law court judge ."


def test_a_packed_row_is_read_as_every_example_packed_in_it(tokenizer, tmp_path):
    from trl import SFTConfig, SFTTrainer
    from tiny import make_model

    data = Dataset.from_dict({"prompt": ["law court", "egg cook", "gene cell"],
                              "completion": [" judge .", " bake .", " protein ."]})
    args = SFTConfig(output_dir=str(tmp_path), packing=True, max_length=64, use_cpu=True, report_to=[])
    trainer = SFTTrainer(model=make_model("llama"), train_dataset=data, processing_class=tokenizer, args=args)
    assert len(trainer.train_dataset) == 1  # all three examples in one row
    corpus = corpus_from_training_dataset(trainer.train_dataset, tokenizer)
    pairs = {(corpus[i].prompt, corpus[i].answer.split(" <eos>")[0]) for i in range(len(corpus))}
    assert pairs == {("law court", " judge ."), ("egg cook", " bake ."), ("gene cell", " protein .")}
    # plain texts packed: each text its own example, not one text joining unrelated ones
    texts = Dataset.from_dict({"text": ["law court judge", "egg cook bake", "gene cell protein"]})
    trainer = SFTTrainer(model=make_model("llama"), train_dataset=texts, processing_class=tokenizer, args=args)
    assert len(trainer.train_dataset) == 1
    corpus = corpus_from_training_dataset(trainer.train_dataset, tokenizer)
    read = sorted(corpus[i].prompt.split(" <eos>")[0] for i in range(len(corpus)))
    assert read == ["egg cook bake", "gene cell protein", "law court judge"]
    assert all(corpus[i].plain_text for i in range(len(corpus)))
    # the same rows as plain records (a list of dicts) are read the same way
    assert len(corpus_from_training_dataset(list(trainer.train_dataset), tokenizer)) == 3


def test_rows_a_tokenizer_returned_are_read_as_dict_rows_with_one_bos(tokenizer):
    # a torch Dataset whose __getitem__ returns tokenizer(text) (a BatchEncoding, not a dict) was refused; rows of
    # tensors kept a second BOS (0-d tensors never equal the BOS id)
    import torch

    texts = ["law court judge", "egg cook bake"]

    class Rows(torch.utils.data.Dataset):
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def __len__(self):
            return len(texts)

        def __getitem__(self, i):
            return tokenizer(texts[i], **self.kwargs)

    for rows in (Rows(), Rows(return_tensors="pt"), [dict(tokenizer(t, return_tensors="pt")) for t in texts]):
        corpus = corpus_from_training_dataset(rows, tokenizer)
        assert [corpus[i].prompt for i in range(len(corpus))] == texts


def test_an_sft_set_that_keeps_its_text_is_read_as_trained_cut_at_max_length(tokenizer, tmp_path):
    from trl import SFTConfig, SFTTrainer
    from tiny import make_model

    long = " ".join(["law court judge contract"] * 20)  # 80 words: cut at max_length=16 tokens when trained
    args = SFTConfig(output_dir=str(tmp_path), max_length=16, use_cpu=True, report_to=[])
    trainer = SFTTrainer(model=make_model("llama"), train_dataset=Dataset.from_dict({"text": [long] * 4}),
                         processing_class=tokenizer, args=args)
    assert "text" in trainer.train_dataset.column_names  # TRL keeps the raw text beside the ids
    example = corpus_from_training_dataset(trainer.train_dataset, tokenizer)[0]
    assert len(tokenizer(example.prompt)["input_ids"]) <= 16 and long.startswith(example.prompt)


def test_rows_that_cannot_be_read_point_to_train_probe(tokenizer):
    with pytest.raises(STSInputError, match="train_probe="):
        corpus_from_training_dataset([3, 4, 5], tokenizer)


def test_kto_data_is_read_as_its_desirable_examples_only(tokenizer):
    data = Dataset.from_dict({"prompt": ["law court", "law court", "egg cook"],
                              "completion": [" judge .", " bake pan", " egg salt"], "label": [True, False, True]})
    with pytest.warns(STSDataWarning, match="1 undesirable example.* of 3 are left out of the forecast"):
        corpus = corpus_from_training_dataset(data, tokenizer)  # was silent
    assert [corpus[i].answer for i in range(len(corpus))] == [" judge .", " egg salt"]
    with pytest.warns(STSDataWarning, match="left out"):
        as_records = corpus_from_training_dataset(list(data), tokenizer)
    assert len(as_records) == 2
    # a KTO eval set as a target domain: every completion is the domain's text, undesirable ones too
    target = corpus_from_training_dataset(data, tokenizer, name="eval", target=True)
    assert [target[i].answer for i in range(len(target))] == [" judge .", " bake pan", " egg salt"]
    with pytest.raises(STSInputError, match="no example labelled desirable"):
        corpus_from_training_dataset(data.map(lambda r: {"label": False}), tokenizer)


def test_unknown_columns(tokenizer):
    with pytest.raises(STSInputError, match="train_probe="):
        corpus_from_training_dataset(Dataset.from_dict({"pixels": [[1, 2]]}), tokenizer)


def _every_span(rows):
    """(row, start, stop) of every packed sequence, listed the straightforward way."""
    spans = []
    for row_index, row in enumerate(rows):
        start = 0
        for length in row["seq_lengths"]:
            spans.append((row_index, start, start + int(length)))
            start += int(length)
    return spans


def test_packed_rows_are_indexed_lazily_as_the_list_of_every_span(tokenizer):
    from sts_callback.integrations.training_data import packed_spans

    texts = ["law court", " judge .", "egg cook", " bake .", "gene cell", " protein .", "tax rule"]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    packs = [[0, 1, 2, 3], [], [4, 5, 6], [1], [6, 0]]  # a row with no sequence too
    data = Dataset.from_dict({"input_ids": [sum((ids[k] for k in p), []) for p in packs],
                              "completion_mask": [sum(([k % 2] * len(ids[k]) for k in p), []) for p in packs],
                              "seq_lengths": [[len(ids[k]) for k in p] for p in packs]})
    for rows in (data, data.shuffle(seed=3), data.select([4, 0, 2]), list(data)):
        expected = _every_span(list(rows))
        spans = packed_spans(rows)
        assert len(spans) == len(expected) and list(spans) == expected
        assert spans[-1] == expected[-1] and spans[-len(expected)] == expected[0]
        with pytest.raises(IndexError):
            spans[len(expected)]
        # the examples read are those of the rows unpacked, in the same order
        unpacked = [{"input_ids": row["input_ids"][start:stop], "completion_mask": row["completion_mask"][start:stop]}
                    for row, start, stop in ((rows[r], a, b) for r, a, b in expected)]
        corpus = corpus_from_training_dataset(rows, tokenizer)
        one_by_one = corpus_from_training_dataset(unpacked, tokenizer)
        assert len(corpus) == len(one_by_one) and list(corpus) == list(one_by_one)
    with pytest.raises(TypeError):  # a malformed row fails when read, as before
        packed_spans(Dataset.from_dict({"input_ids": [[1, 2], [3]], "seq_lengths": [[1, 1], None]}))


def test_kto_desirable_rows_are_those_a_row_by_row_read_keeps(tokenizer):
    prompts = [f"law court {i}" for i in range(12)]
    for labels in ([True, False, None] * 4, [1, 0, 2, 0, 0, 1] * 2, [0.0, 0.5, float("nan")] * 4, [True] * 12):
        data = Dataset.from_dict({"prompt": prompts, "completion": [f" judge {i}" for i in range(12)],
                                  "label": labels})
        for rows in (data, data.shuffle(seed=5), list(data)):
            expected = [row["completion"] for row in rows if bool(row["label"])]
            corpus = corpus_from_training_dataset(rows, tokenizer)
            assert [corpus[i].answer for i in range(len(corpus))] == expected


def _count_row_reads(monkeypatch):
    """Dataset reads by key: a row read in Python (an int, or a column by name) is counted; a slice read as Arrow
    (one bulk read) is not."""
    reads = {"rows": 0, "python_slices": 0, "columns": 0}
    getitem = Dataset.__getitem__

    def counted(self, key):
        if isinstance(key, str):
            reads["columns"] += 1
        elif isinstance(key, slice):
            reads["python_slices"] += self.format["type"] != "arrow"
        else:
            reads["rows"] += 1
        return getitem(self, key)

    monkeypatch.setattr(Dataset, "__getitem__", counted)
    return reads


def test_a_large_packed_or_kto_set_is_read_without_touching_every_row(tokenizer, monkeypatch):
    # every span indexed (or every label read) row by row in Python: 15 s and 230 MB for 400k packed rows
    from sts_callback.integrations.training_data import packed_spans

    n = 200_000
    ids = tokenizer("law court judge", add_special_tokens=False)["input_ids"]
    packed = Dataset.from_dict({"input_ids": [ids * 2] * n, "seq_lengths": [[len(ids)] * 2] * n})
    kto = Dataset.from_dict({"prompt": ["law court"] * n, "completion": [" judge ."] * n,
                             "label": [i % 3 == 0 for i in range(n)]})
    reads = _count_row_reads(monkeypatch)
    spans = packed_spans(packed)
    assert len(spans) == 2 * n and spans[2 * n - 1] == (n - 1, len(ids), 2 * len(ids))
    corpus = corpus_from_training_dataset(packed, tokenizer)
    assert len(corpus) == 2 * n and corpus[2 * n - 1].prompt == "law court judge"
    desirable = corpus_from_training_dataset(kto, tokenizer)
    assert len(desirable) == (n + 2) // 3 and desirable[-1].answer == " judge ."
    assert reads["columns"] == reads["python_slices"] == 0 and reads["rows"] < 20


def test_left_padding_masked_in_the_labels_is_no_prompt(tokenizer):
    """A tokenizer that pads on the left (Gemma's default), labels -100 over the padding only: plain text, as the
    same rows padded on the right; a masked prompt after the padding still splits."""
    ids = tokenizer("law court judge .")["input_ids"]
    pad = tokenizer.pad_token_id
    rows = {"input_ids": [[pad] * 3 + ids], "attention_mask": [[0] * 3 + [1] * len(ids)],
            "labels": [[-100] * 3 + ids]}
    example = corpus_from_training_dataset(Dataset.from_dict(rows), tokenizer)[0]
    assert example.plain_text and example.prompt == "law court judge ."
    only_bos_masked = Dataset.from_dict({"input_ids": [ids], "labels": [[-100] + ids[1:]]})
    assert corpus_from_training_dataset(only_bos_masked, tokenizer)[0].plain_text
    prompt_masked = dict(rows, labels=[[-100] * 6 + ids[3:]])
    example = corpus_from_training_dataset(Dataset.from_dict(prompt_masked), tokenizer)[0]
    assert (example.prompt, example.answer) == ("law court", " judge .")


def test_labels_decide_over_a_mask_trl_kept_but_did_not_apply(tokenizer):
    """TRL 1 with completion_only_loss=False keeps `completion_mask` and trains every token (labels = ids)."""
    prompt, completion = tokenizer("law court")["input_ids"], tokenizer("judge .")["input_ids"][1:]
    ids = prompt + completion
    data = Dataset.from_dict({"input_ids": [ids], "labels": [ids],
                              "completion_mask": [[0] * len(prompt) + [1] * len(completion)]})
    assert corpus_from_training_dataset(data, tokenizer)[0].plain_text


def test_a_wrapped_packed_row_gives_its_first_whole_prompt_and_answer(tokenizer):
    """packing_strategy="wrapped" writes no seq_lengths: the row is prompt, answer, prompt, answer, cut anywhere;
    a leading answer (the tail of an example the row before cut) is skipped."""
    def part(text, trained, bos=False):  # TRL tokenizes each example with its BOS, masked with its prompt
        ids = tokenizer(text)["input_ids"][0 if bos else 1:]
        return ids, [(i if trained else -100) for i in ids]

    parts = [part("judge .", True), part("egg cook", False, bos=True), part("bake .", True),
             part("gene", False, bos=True), part("protein .", True)]
    ids = [i for p, _ in parts for i in p]
    labels = [label for _, ls in parts for label in ls]
    example = corpus_from_training_dataset(Dataset.from_dict({"input_ids": [ids], "labels": [labels]}), tokenizer)[0]
    assert (example.prompt, example.answer) == ("egg cook", " bake .")


def test_a_tokenized_dataset_is_a_train_probe_like_the_trainers_own(tokenizer):
    from sts_callback.integrations.training_data import probe_corpus

    prompt, completion = tokenizer("law court")["input_ids"], tokenizer("judge .")["input_ids"][1:]
    data = Dataset.from_dict({"input_ids": [prompt + completion],
                              "labels": [[-100] * len(prompt) + completion]})
    example = probe_corpus(data, None, None, tokenizer)[0]
    assert (example.prompt, example.answer) == ("law court", " judge .")


def test_a_multiple_choice_dataset_is_a_scored_target_domain(tokenizer):
    """An MMLU-like datasets.Dataset (question / choices / answer) was refused at train start naming its columns,
    though forecast() took it."""
    from sts_callback.core.data import multiple_choice_items
    from sts_callback.integrations.training_data import target_corpora

    items = [{"question": "law court", "choices": ["judge", "cook"], "answer": 0},
             {"question": "oven flour", "choices": ["gene", "bake"], "answer": 1}]
    domains, _ = target_corpora({"quiz": Dataset.from_list(items)}, None, tokenizer)
    assert multiple_choice_items(domains["quiz"]) == items


def test_a_tokenized_conversation_keeps_its_later_turns(tokenizer):
    """assistant_only_loss-style labels over two assistant turns, no BOS between them: one conversation, whose
    answer goes on to its last turn (read as separate examples, the later turns were dropped)."""
    def part(text, trained):
        ids = tokenizer(text)["input_ids"][1:]
        return ids, [(i if trained else -100) for i in ids]

    parts = [part("law court", False), part("judge .", True), part("cook", False), part("bake oven .", True)]
    ids = [tokenizer.bos_token_id] + [i for p, _ in parts for i in p]
    labels = [-100] + [label for _, ls in parts for label in ls]
    example = corpus_from_training_dataset(Dataset.from_dict({"input_ids": [ids], "labels": [labels]}), tokenizer)[0]
    assert (example.prompt, example.answer) == ("law court", " judge . cook bake oven .")
    packed_texts = ids + [tokenizer.bos_token_id] + ids[1:]  # plain texts packed whole: every token trained
    assert corpus_from_training_dataset(Dataset.from_dict({"input_ids": [packed_texts], "labels": [packed_texts]}),
                                        tokenizer)[0].plain_text


@pytest.mark.parametrize("max_length, read_raw", [(24, False), (512, True)])
def test_chats_a_trainer_cut_at_max_length_are_read_as_it_trains_them(tokenizer, tmp_path, max_length, read_raw):
    """TRL keeps the raw conversations beside the ids it cut at max_length: the forecast reads what is trained
    (the raw turns lay out better, so they are kept where no row was cut)."""
    from tiny import domain_texts, make_model
    from trl import SFTConfig, SFTTrainer

    law, food = domain_texts("law", 8, length=30), domain_texts("food", 8, length=12)
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": a}] for a in law],
                              "completion": [[{"role": "assistant", "content": b}] for b in food]})
    trainer = SFTTrainer(model=make_model("llama"), train_dataset=data, processing_class=tokenizer,
                         args=SFTConfig(output_dir=str(tmp_path), max_length=max_length, use_cpu=True, report_to=[]))
    corpus = probe_corpus(None, trainer, None, tokenizer)
    assert all(corpus[i].is_chat == read_raw for i in range(len(corpus)))
    food_words = set(" ".join(food).split())
    trained = []
    for row in trainer.train_dataset:
        words = tokenizer.decode([i for i, label in zip(row["input_ids"], row["labels"]) if label != -100]).split()
        trained.append([w for w in words if w in food_words])
    read = [[w for w in (corpus[i].answer or "").split() if w in food_words] for i in range(len(corpus))]
    assert [w for words in read for w in words] == [w for words in trained for w in words]
    assert read_raw or sum(map(len, trained)) < sum(len(t.split()) for t in food)  # the cut is what the test is about


def test_a_packed_piece_training_trains_nothing_of_is_no_training_text(tokenizer):
    """packing_strategy="bfd_split" / "wrapped" split a long prompt into pieces whose labels are all -100: such a
    piece is no plain text the forecast trains on (nor a demonstration)."""
    from sts_callback.pipelines.recipe import training_features

    prompt, answer = tokenizer("law court judge")["input_ids"], tokenizer("cook bake")["input_ids"][1:]
    data = Dataset.from_dict({"input_ids": [prompt, prompt + answer],
                              "labels": [[-100] * len(prompt), [-100] * len(prompt) + answer]})
    corpus = corpus_from_training_dataset(data, tokenizer)
    assert not corpus[0].can_demonstrate and (corpus[1].prompt, corpus[1].answer) == ("law court judge", " cook bake")
    assert len(training_features(corpus, tokenizer, 64, completion_only=True, chat_fallback=False)) == 1


def test_a_wrapped_piece_that_trains_an_answers_tail_then_masks_a_prompt_is_read_as_that_tail(tokenizer):
    tail = tokenizer("cook bake", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt = tokenizer("law court judge appeal")["input_ids"]  # the next example's prompt, cut off: masked
    data = Dataset.from_dict({"input_ids": [tail + prompt], "labels": [tail + [-100] * len(prompt)]})
    example = corpus_from_training_dataset(data, tokenizer)[0]
    assert example.plain_text and example.prompt == "cook bake <eos>"


def test_kto_rows_the_collator_cuts_at_max_length_are_read_as_cut(tokenizer):
    """KTO's collator keeps the first max_length tokens of prompt + completion: the desirable completions are read
    as trained where a row reaches it, raw where none does."""
    prompt, completion = "law court judge", "cook bake flour sugar oven"
    row = {"prompt": prompt, "completion": completion, "label": True, "prompt_ids": tokenizer(prompt)["input_ids"],
           "completion_ids": tokenizer(completion, add_special_tokens=False)["input_ids"]}
    data = Dataset.from_list([row, {**row, "label": False}])
    assert corpus_from_training_dataset(data, tokenizer, max_length=6)[0].answer == " cook bake"  # 4 prompt ids
    whole = corpus_from_training_dataset(data, tokenizer, max_length=64)
    assert len(whole) == 1 and whole[0].answer == completion


@pytest.mark.parametrize("kind, option", [("messages", "assistant_only_loss"), ("prompt_completion",
                                                                                 "completion_only_loss")])
@pytest.mark.parametrize("only_the_answer", [True, False])
def test_chats_trained_on_every_token_are_read_as_one_trained_text(tokenizer, tmp_path, kind, option,
                                                                   only_the_answer):
    """With assistant_only_loss / completion_only_loss off the trainer trains the user turns too: the chats were
    read as prompt and answer all the same (the forecast as for assistant-only training)."""
    from tiny import domain_texts, make_model
    from trl import SFTConfig, SFTTrainer

    chat_tokenizer = copy.deepcopy(tokenizer)
    chat_tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}"
        "{{ m['content'] }}<|end|>{% endgeneration %}{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    law, food = domain_texts("law", 8), domain_texts("food", 8, seed=1)
    users, answers = [[{"role": "user", "content": a}] for a in law], [{"role": "assistant", "content": b}
                                                                       for b in food]
    data = Dataset.from_dict({"messages": [u + [a] for u, a in zip(users, answers)]} if kind == "messages" else
                             {"prompt": users, "completion": [[a] for a in answers]})
    trainer = SFTTrainer(model=make_model("llama"), train_dataset=data, processing_class=chat_tokenizer,
                         args=SFTConfig(output_dir=str(tmp_path), max_length=512, use_cpu=True, report_to=[],
                                        **{option: only_the_answer}))
    corpus = probe_corpus(None, trainer, None, chat_tokenizer)
    law_words = set(" ".join(law).split()) - set(" ".join(food).split())
    for i, row in enumerate(trainer.train_dataset):
        trained = chat_tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])
        read = corpus[i].answer if not corpus[i].plain_text else corpus[i].prompt
        assert corpus[i].plain_text != only_the_answer
        assert bool(law_words & set(trained.split())) != only_the_answer  # the user turn trained, or not
        assert [w for w in read.split() if w in law_words] == [w for w in trained.split() if w in law_words]


def tokenizer_without_bos():
    """A tokenizer that adds no BOS itself, whose chat template writes it (Gemma's with add_bos_token=False)."""
    from tokenizers import processors

    plain = make_tokenizer()
    plain._tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    return plain


@pytest.mark.parametrize("adds_bos", [True, False])
def test_a_bos_the_chat_template_writes_stays_in_what_is_measured(adds_bos):
    """TRL's rows of chats begin with the BOS the template wrote; it was stripped ('the prompt builder adds BOS')
    where the builder adds none: the probe and demonstrations had no BOS the model was trained with (+30-60% NLL
    on Gemma 3 270M), and a context cut to max_length lost its BOS as well."""
    from sts_callback.core.data import PromptBuilder

    tokenizer = make_tokenizer() if adds_bos else tokenizer_without_bos()
    bos = tokenizer.bos_token_id
    rows = []
    for question, answer in (("law court ?", "judge ."), ("chem acid ?", "base ."), ("food cook ?", "bake .")):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False)
        full = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                              {"role": "assistant", "content": answer}], tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        assert full_ids[0] == bos and full_ids.count(bos) == 1  # as trained
        rows.append({"input_ids": full_ids, "completion_mask": [0] * len(prompt_ids) + [1] * (len(full_ids) -
                                                                                           len(prompt_ids))})
    corpus = corpus_from_training_dataset(Dataset.from_list(rows), tokenizer)
    builder = PromptBuilder(tokenizer, max_query_tokens=64, max_demonstration_tokens=64, max_length=256)
    alone, _ = builder.single(corpus[0])
    assert alone[0] == bos and alone.count(bos) == 1
    whole = builder.pair(corpus[0], [corpus[1], corpus[2]]).context
    cut = PromptBuilder(tokenizer, max_query_tokens=64, max_demonstration_tokens=64, max_length=len(alone) + 4)
    pair = cut.pair(corpus[0], [corpus[1], corpus[2]])  # the demonstrations cut from the left
    assert pair.base[0] == pair.context[0] == bos  # the BOS, then the uncut context's last tokens
    assert pair.context[1:] == whole[len(whole) - len(pair.context) + 1:]


def test_documents_joined_by_eos_keep_it_when_pad_is_eos():
    """pad_token = eos_token (GPT-2's usual fix-up, Qwen's base tokenizer): every EOS was dropped as padding, the
    documents of a row glued into one text."""
    tokenizer = make_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id
    ids = tokenizer("law court .")["input_ids"] + [eos] + tokenizer("cell acid .", add_special_tokens=False)[
        "input_ids"] + [eos, eos, eos]  # the last two: right padding
    text = corpus_from_training_dataset(Dataset.from_dict({"input_ids": [ids]}), tokenizer)[0].prompt
    assert text.split() == ["law", "court", ".", "<eos>", "cell", "acid", ".", "<eos>"]
    padded = tokenizer("law court judge", padding="max_length", max_length=10)  # padding the mask says is padding
    assert padded["input_ids"][-1] == eos and padded["attention_mask"][-1] == 0
    text = corpus_from_training_dataset(Dataset.from_dict({k: [v] for k, v in padded.items()}), tokenizer)[0].prompt
    assert text.split() == ["law", "court", "judge"]


def test_a_tokenizer_that_appends_eos_puts_none_between_prompt_and_answer():
    """add_eos_token=True (a common SFT fix-up): the multiple-choice question and validate's training prompts were
    tokenized with it, an EOS before the choice / answer."""
    from tokenizers import processors
    from tiny import make_model

    from sts_callback.core.data import load_corpus
    from sts_callback.core.multiple_choice import choice_scores
    from sts_callback.pipelines.recipe import training_features

    plain, appending = make_tokenizer(), make_tokenizer()
    appending._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 2)])
    assert appending("law")["input_ids"][-1] == appending.eos_token_id
    item = {"question": "law court ?", "choices": ["judge", "acid"], "answer": 0}
    model = make_model("llama")
    assert choice_scores(model, appending, item) == choice_scores(model, plain, item)
    corpus = load_corpus([{"prompt": "law court ?", "completion": " judge ."}])
    assert training_features(corpus, appending, 64, True, False) == training_features(corpus, plain, 64, True, False)


def test_a_prompt_and_answer_decoded_from_ids_join_as_the_trained_text_under_a_sentencepiece_decoder():
    """Llama 2's / Mistral's decoder strips the first space of what it decodes: decoded apart, the answer lost
    the space at its join, and the target domain measured "two?Answer:" (other tokens) where training saw
    "two? Answer:"."""
    from tiny import make_sentencepiece_tokenizer

    from sts_callback.core.data import PromptBuilder, domain_example

    tokenizer = make_sentencepiece_tokenizer()
    prompt = tokenizer("Question: what is two plus two?")["input_ids"]
    answer = tokenizer(" Answer: four.", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(answer) == "Answer: four."  # the decoder's own strip: the defect's cause
    rows = {"input_ids": [prompt + answer], "completion_mask": [[0] * len(prompt) + [1] * len(answer)],
            "labels": [[-100] * len(prompt) + answer]}
    for mask in ("completion_mask", "labels"):
        example = corpus_from_training_dataset(Dataset.from_dict({"input_ids": rows["input_ids"], mask: rows[mask]}),
                                               tokenizer)[0]
        assert example.prompt + example.answer == "Question: what is two plus two? Answer: four."
        builder = PromptBuilder(tokenizer, max_query_tokens=64, max_demonstration_tokens=64, max_length=256)
        ids, counted = builder.single(domain_example(example))
        assert [i for i, c in zip(ids, counted) if c] == prompt + answer  # measured on the trained tokens
