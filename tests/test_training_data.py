"""Reading a trainer's train dataset back as examples, raw or tokenized as TRL leaves it."""

import pytest
from datasets import Dataset
from tiny import make_tokenizer

from sts_callback import STSInputError
from sts_callback.core.data import example_from_record
from sts_callback.integrations.training_data import corpus_from_training_dataset


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
    assert example.prompt == "law court" and example.answer == "judge ."


def test_tokenized_sft_with_completion_mask(tokenizer):
    prompt, completion = tokenizer("law court")["input_ids"], tokenizer("judge .")["input_ids"][1:]
    data = Dataset.from_dict({"input_ids": [prompt + completion],
                              "completion_mask": [[0] * len(prompt) + [1] * len(completion)]})
    example = corpus_from_training_dataset(data, tokenizer)[0]
    assert (example.prompt, example.answer) == ("law court", "judge .")
    plain = corpus_from_training_dataset(Dataset.from_dict({"input_ids": [prompt]}), tokenizer)[0]
    assert plain.plain_text and plain.prompt == "law court"


def test_labels_masking_the_prompt_split_it_as_trl_and_hand_tokenized_sets_leave_it(tokenizer):
    prompt, completion = tokenizer("law court")["input_ids"], tokenizer("judge .")["input_ids"][1:]
    data = Dataset.from_dict({"input_ids": [prompt + completion], "labels": [[-100] * len(prompt) + completion]})
    example = corpus_from_training_dataset(data, tokenizer)[0]
    assert (example.prompt, example.answer) == ("law court", "judge .")
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
    assert pairs == {("law court", "judge ."), ("egg cook", "bake ."), ("gene cell", "protein .")}
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
    corpus = corpus_from_training_dataset(data, tokenizer)
    assert [corpus[i].answer for i in range(len(corpus))] == [" judge .", " egg salt"]
    as_records = corpus_from_training_dataset(list(data), tokenizer)
    assert len(as_records) == 2
    with pytest.raises(STSInputError, match="no example labelled desirable"):
        corpus_from_training_dataset(data.map(lambda r: {"label": False}), tokenizer)


def test_unknown_columns(tokenizer):
    with pytest.raises(STSInputError, match="train_probe="):
        corpus_from_training_dataset(Dataset.from_dict({"pixels": [[1, 2]]}), tokenizer)
