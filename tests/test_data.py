"""Position-matched prompts: a query's tokens are the same ids at the end of the sequence with and without
demonstrations, only they are counted, and demonstrations are cut from the left."""

import json

import pytest
from tiny import domain_texts, make_tokenizer

from sts_callback.core.data import (Example, PromptBuilder, example_from_record, load_corpus, load_domains,
                                   multiple_choice_items)
from sts_callback.core.errors import STSDataWarning, STSInputError


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def builder(tokenizer, **overrides):
    values = dict(max_query_tokens=12, max_demonstration_tokens=10, max_length=64)
    values.update(overrides)
    return PromptBuilder(tokenizer, **values)


@pytest.mark.parametrize("chat", [False, True])
def test_query_tokens_are_the_same_ids_at_the_end_of_both_sequences(tokenizer, chat):
    b = builder(tokenizer)
    texts = domain_texts("law", 4)
    if chat:
        query = Example(prompt=[{"role": "user", "content": texts[0]}], answer=None)
        demos = [Example(prompt=[{"role": "user", "content": t}], answer="court") for t in texts[1:]]
    else:
        query, demos = Example(prompt=texts[0], plain_text=True), [Example(prompt=t, answer="court") for t in texts[1:]]
    pair = b.pair(query, demos)
    assert pair.base[-pair.n_query:] == pair.context[-pair.n_query:]
    assert len(pair.counted) == pair.n_query and len(pair.context) > len(pair.base)
    special = set(tokenizer.all_special_ids)
    query_ids = pair.base[-pair.n_query:]
    assert pair.counted == [t not in special for t in query_ids]


def test_demonstrations_are_cut_from_the_left_and_bos_is_kept(tokenizer):
    b = builder(tokenizer, max_length=20)
    demos = [Example(prompt=t, answer="court") for t in domain_texts("food", 6)]
    pair = b.pair(Example(prompt=domain_texts("law", 1)[0], plain_text=True), demos)
    assert len(pair.context) <= 20 and pair.context[0] == tokenizer.bos_token_id
    assert pair.context[-pair.n_query:] == pair.base[-pair.n_query:]


def test_single_counts_only_the_text_itself(tokenizer):
    ids, counted = builder(tokenizer).single(Example(prompt=domain_texts("chem", 1)[0], plain_text=True))
    assert len(ids) == len(counted) and counted[0] is False and all(counted[1:])  # BOS is not counted


def test_multiple_choice_records_become_question_and_right_answer():
    example = example_from_record({"question": "2+2?", "choices": ["3", "4"], "answer": 1})
    assert example.prompt == "2+2?\nAnswer:" and example.answer == " 4"
    corpus = load_corpus([{"question": "q", "choices": ["a", "b"], "answer": 0}], name="quiz")
    assert multiple_choice_items(corpus) == [{"question": "q", "choices": ["a", "b"], "answer": 0}]
    assert multiple_choice_items(load_corpus(["plain text"])) is None
    with pytest.raises(STSInputError, match="answer=5"):
        example_from_record({"question": "q", "choices": ["a", "b"], "answer": 5})


def test_multiple_choice_items_in_the_common_layouts_and_answer_forms():
    """MMLU's answer as a letter or the choice's text, ARC's choices {text, label} with answerKey, HellaSwag's
    ctx / endings / label: each was refused (a letter only at train start, "item 0 of example 23"); a Dataset of
    them too, and a domain mixing items with plain texts lost its accuracy without a word."""
    from datasets import Dataset

    expected = {"question": "2+2?", "choices": ["3", "4", "5"], "answer": 1}
    for record in ({"question": "2+2?", "choices": ["3", "4", "5"], "answer": "B"},
                   {"question": "2+2?", "choices": ["3", "4", "5"], "answer": "4"},  # its text, not an index
                   {"question": "2+2?", "choices": ["3", "4", "5"], "answer": "1"},
                   {"question": "2+2?", "choices": {"text": ["3", "4", "5"], "label": ["A", "B", "C"]},
                    "answerKey": "B"},
                   {"ctx": "2+2?", "endings": ["3", "4", "5"], "label": "1"}):
        corpus = load_corpus([record] * 3, name="quiz")
        assert multiple_choice_items(corpus) == [expected] * 3
        assert example_from_record(record).answer == " 4"
    assert multiple_choice_items(load_corpus(Dataset.from_list([expected] * 3), name="quiz")) == [expected] * 3
    with pytest.raises(STSInputError, match=r"example 1 of 'quiz' has answer='E'; give the index \(0..2\)"):
        load_corpus([expected, {**expected, "answer": "E"}], name="quiz")[1]
    with pytest.warns(STSDataWarning, match="mixes 2 multiple-choice item"):
        assert multiple_choice_items(load_corpus([expected, "plain text", expected], name="mixed")) is None
    # an item with a question and choices lacks only its answer (a typo'd key): named, not taken for a text that
    # turns the domain's accuracy off with a warning
    typo = {"question": "2+2?", "choices": ["3", "4"], "answers": 1}
    with pytest.raises(STSInputError, match=r"example 1 of 'quiz' has 'question' and 'choices' but no 'answer' "
                                            r"\(its keys: \['answers', 'choices', 'question'\]\)"):
        multiple_choice_items(load_corpus([expected, typo, expected], name="quiz"))


def test_a_multiple_choice_answer_read_two_ways_or_a_repeated_choice_is_refused_naming_the_item():
    """answer "1" among choices "1".."4" was the text "1" (index 0), among "2", "5", "7", "9" the index 1: one set,
    two readings item by item; "A" among "B", "C", "A", "D" was the text (2), not the letter (0). A choice given
    twice scored alike and the first copy won every tie: an answer on the second could never count as right."""
    from sts_callback.core.multiple_choice import check_item

    with pytest.raises(STSInputError, match=r"item 3 has answer='1', which is the text of choice 0 and as an "
                                            r"index, choice 1; give the index as a number"):
        check_item({"question": "q", "choices": ["1", "2", "3", "4"], "answer": "1"}, "item 3")
    with pytest.raises(STSInputError, match=r"answer='A', which is the text of choice 2 and as a letter, choice 0"):
        check_item({"question": "q", "choices": ["B", "C", "A", "D"], "answer": "A"}, "item 0")
    with pytest.raises(STSInputError, match=r"item 0 has the choice\(s\) \['four'\] more than once"):
        check_item({"question": "q", "choices": ["four", "four ", "five"], "answer": 0}, "item 0")
    # one reading, or readings that agree: taken
    assert check_item({"question": "q", "choices": ["2", "5", "7", "9"], "answer": "1"}, "i")["answer"] == 1
    assert check_item({"question": "q", "choices": ["0", "1", "2"], "answer": "1"}, "i")["answer"] == 1
    assert check_item({"question": "q", "choices": ["1", "2", "3", "4"], "answer": 0}, "i")["answer"] == 0


def test_a_streaming_dataset_is_read_from_its_head():
    from datasets import IterableDataset

    stream = IterableDataset.from_generator(lambda: ({"text": f"text {i}"} for i in range(10)))
    corpus = load_corpus(stream, name="stream")
    assert len(corpus) == 10 and corpus[3].prompt == "text 3"


# --------------------------------------------------------------------------- inputs named in every error
def test_two_keys_with_one_name_are_an_error_not_a_silent_merge():
    from sts_callback.core.data import load_domains

    with pytest.raises(STSInputError, match=r"targets has two entries named '1' \(keys 1 and '1'\).*rename one"):
        load_domains({1: ["a b"], "1": ["c d"], "x": ["e f"]})
    assert list(load_domains({1: ["a b"], "x": ["e f"]})) == ["1", "x"]  # a lone int key is still a name


@pytest.mark.parametrize("value, words", [
    (5, "Cannot use int 5 as data for target 'chem'"),
    (None, "Cannot use NoneType None as data for target 'chem'"),
    ({"a": 1}, "A dict is not a dataset here (given for target 'chem')"),
    ("no_such_domain_xyz", "'no_such_domain_xyz' for target 'chem' is neither an existing file"),
    ("missing.jsonl", "Data file missing.jsonl for target 'chem' does not exist"),
    ("", "An empty path or name for target 'chem'"),
])
def test_a_value_that_cannot_be_data_names_its_target(value, words):
    from sts_callback.core.data import load_domains

    with pytest.raises(STSInputError) as err:
        load_domains({"chem": value, "food": ["a b"]})
    assert words in str(err.value)
    with pytest.raises(STSInputError, match=r"for targets\[1\]"):
        load_domains(["legal", value])
    with pytest.raises(STSInputError, match="for 'train'"):
        load_corpus(value, name="train")


@pytest.mark.parametrize("entry, words", [
    (["a b", "c d"], r"targets\[1\] is a list of 2 texts without a name: .* give data under a name: "
                     r"targets=\{'law': \[...\]\}"),
    ("the court held that the statute applies", r"targets\[1\] \('the court held that the statute applies'\) "
                                                r"looks like a text, not a domain name or a data file"),
])
def test_a_list_of_targets_names_each_domain(entry, words):
    """In a list every entry names its domain (a registered name or a file): texts there had been named 'data' and
    the second such entry was refused as a duplicate name; a text, as an unknown domain."""
    from sts_callback.core.data import load_domains

    with pytest.raises(STSInputError, match=words):
        load_domains(["legal", entry])
    with pytest.raises(STSInputError, match="target 'chem' is empty; give it at least one text"):
        load_domains({"chem": []})
    with pytest.raises(STSInputError, match="got a generator; name the domain"):
        load_domains(text for text in ["a b"])


def test_unreadable_data_files_are_input_errors_naming_file_and_target(tmp_path):
    from sts_callback.core.data import load_domains

    broken = tmp_path / "broken.json"
    broken.write_text("[1, 2")
    with pytest.raises(STSInputError, match=r"broken.json \(target 'chem'\) is not valid JSON .* line 1"):
        load_domains({"chem": str(broken)})
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(STSInputError, match=r"latin.jsonl \(target 'chem'\) is not UTF-8"):
        load_domains({"chem": str(latin)})
    scalar = tmp_path / "scalar.json"
    scalar.write_text("3")
    with pytest.raises(STSInputError, match=r"scalar.json \(target 'chem'\) must hold a JSON list"):
        load_domains({"chem": str(scalar)})
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "line\\u2028break"}\n{"text": "b"}\n'.replace("\\u2028", "\u2028"))
    assert [e.prompt for e in load_corpus(str(texts))] == ["line\u2028break", "b"]  # U+2028 is no line end


@pytest.mark.parametrize("record", [
    {"messages": [{"role": "user", "content": "what is the answer ?"}, {"role": "assistant", "content": "butter pan bake"}]},
    {"prompt": "what is the answer ?", "completion": " butter pan bake"},
    {"prompt": [{"role": "user", "content": "what is the answer ?"}],
     "completion": [{"role": "assistant", "content": "butter pan bake"}]},
    {"question": "what is the answer ?", "choices": ["butter pan bake", "law court"], "answer": 0},
])
def test_a_target_domain_is_measured_on_its_answers_not_its_prompts_alone(tokenizer, record):
    from sts_callback.core.data import load_domains

    domain = load_domains({"food": [record, record]})["food"]
    b = builder(tokenizer, max_query_tokens=32)
    ids, counted = b.single(domain[0])
    text = tokenizer.decode([t for t, c in zip(ids[len(ids) - len(counted):], counted) if c])
    assert "what is the answer" in text and "butter pan bake" in text  # the held-out loss and the domain's latents read both
    pair = b.pair(domain[0], [domain[1]])  # in context: the other text, answer included, as the demonstration
    assert tokenizer.decode(pair.context).count("butter pan bake") == 2
    if "choices" in record:
        assert multiple_choice_items(domain) is not None  # the items stay scorable for accuracy


# --------------------------------------------------------------------------- data files of every documented kind
def test_csv_tsv_and_parquet_files_are_read_as_records_not_as_one_text(tmp_path):
    import pandas as pd

    texts = domain_texts("law", 12)
    pd.DataFrame({"text": texts, "id": range(12)}).to_csv(tmp_path / "law.csv", index=False)
    pd.DataFrame({"text": texts}).to_parquet(tmp_path / "law.parquet")
    (tmp_path / "qa.TSV").write_text("prompt\tcompletion\nwhat is law ?\tcourt\n")
    for name in ("law.csv", "law.parquet"):
        corpus = load_corpus(str(tmp_path / name))
        assert [e.prompt for e in corpus] == texts  # neither the header nor the quotes become training text
    assert (load_corpus(str(tmp_path / "qa.TSV"))[0].prompt, load_corpus(str(tmp_path / "qa.TSV"))[0].answer) == (
        "what is law ?", "court")
    # every CSV cell is text: a number-like text, quotes and a quoted line break stay as written
    (tmp_path / "odd.csv").write_text('text\n7\n"a ""quoted"" text\non two lines"\n')
    assert [e.prompt for e in load_corpus(str(tmp_path / "odd.csv"))] == ["7", 'a "quoted" text\non two lines']
    # chat conversations in a Parquet column
    chat = [{"role": "user", "content": "what is law ?"}, {"role": "assistant", "content": "court"}]
    pd.DataFrame({"messages": [chat, chat]}).to_parquet(tmp_path / "chat.parquet")
    assert load_corpus(str(tmp_path / "chat.parquet"))[0].answer == "court"


def test_a_table_without_a_text_column_is_refused_naming_its_columns(tmp_path):
    import pandas as pd

    pd.DataFrame({"body": domain_texts("law", 5)}).to_csv(tmp_path / "law.csv", index=False)
    pd.DataFrame({"body": domain_texts("law", 5)}).to_parquet(tmp_path / "law.parquet")
    for name in ("law.csv", "law.parquet"):
        with pytest.raises(STSInputError, match=rf"{name} \('train'\) has columns \['body'\] but none of 'text'.*"
                                                "rename its text column to 'text'"):
            load_corpus(str(tmp_path / name), name="train")
    (tmp_path / "broken.parquet").write_text("text\nnot parquet at all\n")
    with pytest.raises(STSInputError, match=r"broken.parquet \('train'\) cannot be read as Parquet"):
        load_corpus(str(tmp_path / "broken.parquet"), name="train")


@pytest.mark.parametrize("name", ["law.gz", "law.pkl", "law.xlsx"])
def test_a_file_of_an_unknown_kind_is_refused_listing_the_kinds_read(tmp_path, name):
    from sts_callback.core.data import check_data_spec

    (tmp_path / name).write_bytes(b"\x1f\x8b\x08\x00 binary")
    for check in (lambda: check_data_spec(str(tmp_path / name), "target 'law'"),
                  lambda: load_corpus(str(tmp_path / name), name="law")):
        with pytest.raises(STSInputError, match=r"has the suffix '\.\w+', which is no data format read here; give "
                                                r"\.jsonl or \.json .*\.csv, \.tsv or \.parquet.*plain text"):
            check()


def test_plain_text_is_split_at_blank_lines_and_one_text_per_line_is_flagged(tmp_path):
    from sts_callback.core.errors import STSDataWarning

    texts = domain_texts("law", 30)
    (tmp_path / "lines.txt").write_text("\n".join(texts))
    with pytest.warns(STSDataWarning, match=r"lines.txt \('train'\) has 30 lines and no blank line, so it is read as "
                                            r"one text.*separated by blank lines.*\.jsonl"):
        assert len(load_corpus(str(tmp_path / "lines.txt"), name="train")) == 1
    # blank lines separate texts, a Windows line end or a line of spaces too; no warning then
    (tmp_path / "blocks.txt").write_bytes("\r\n\r\n".join(texts[:2]).encode() + b"\n   \n" + texts[2].encode())
    (tmp_path / "notes").write_text("\n\n".join(texts))
    (tmp_path / "short.md").write_text("\n".join(texts[:3]))  # a few lines: one text, as plain text is meant
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", STSDataWarning)
        assert [e.prompt for e in load_corpus(str(tmp_path / "blocks.txt"))] == texts[:3]
        assert len(load_corpus(str(tmp_path / "notes"))) == 30
        assert len(load_corpus(str(tmp_path / "short.md"))) == 1


@pytest.mark.parametrize("value, shown", [(7, "int 7"), (None, r"null \(None\)"), (["a"], r"list \['a'\]")])
def test_a_text_that_is_not_a_string_is_named_with_its_type_and_line(tmp_path, value, shown):
    import json

    with pytest.raises(STSInputError, match=rf"example 1 of 'train': its 'text' is {shown}, but 'text' must be a "
                                            "string"):
        load_corpus([{"text": "law court"}, {"text": value}], name="train")[1]
    path = tmp_path / "nums.jsonl"
    path.write_text('{"text": "law court"}\n\n' + json.dumps({"text": value}) + "\n")
    with pytest.raises(STSInputError, match=rf"example 1 of 'train' \(.*nums.jsonl line 3\): its 'text' is {shown}"):
        load_corpus(str(path), name="train")[1]
    with pytest.raises(STSInputError, match=r"its 'prompt' is int 3, but 'prompt' must be a string or chat messages"):
        example_from_record({"prompt": 3, "completion": "x"})


@pytest.mark.parametrize("name", ["", "   ", "\t"])
def test_an_empty_domain_name_is_refused(name):
    from sts_callback.core.data import load_domains

    with pytest.raises(STSInputError, match=r"targets has an entry with the empty name .*; give it a name"):
        load_domains({name: domain_texts("law", 5), "food": domain_texts("food", 5)})


def test_all_but_draws_exactly_what_the_list_without_the_excluded_index_gives():
    """AllBut stands for ``[i for i in items if i != excluded]`` (built per query, quadratic in a large set):
    random.sample must draw the very same elements from it, for ranges and sparse pools, small and large."""
    import random

    from sts_callback.core.data import AllBut

    for n in (1, 2, 5, 40, 1000):
        for items in (range(n), list(range(0, 3 * n, 3))):
            for excluded in (None, 0, items[len(items) // 2], items[-1], -7, 3 * n + 1):
                expected = [i for i in items if i != excluded]
                view = AllBut(items, excluded)
                assert len(view) == len(expected) and list(view) == expected
                assert not expected or view[-1] == expected[-1]
                for k in (1, 2, 8):
                    if k <= len(expected):
                        seed = f"{n}:{excluded}:{k}"
                        assert random.Random(seed).sample(view, k) == random.Random(seed).sample(expected, k)


def test_a_huge_text_is_tokenized_only_as_far_as_its_first_tokens(tokenizer):
    """A 5-MB text in a domain was tokenized whole, several times (10 s and 1.3 GB at train start), for the few
    hundred tokens kept: a prefix of its characters is, widened while it holds too few, with the same ids."""
    b = builder(tokenizer, max_query_tokens=256, max_demonstration_tokens=384, max_length=1024)
    words = " ".join(domain_texts("law", 400))
    for text in (words[:1500], words[:5000], words, "x" + " " * 20_000 + " court law", words.replace(" ", "")):
        for tokens in (1, 12, 256, 384):
            assert b.encode_head(text, tokens) == b.encode_text(text)[:tokens]
    lengths = []
    encode = b.encode_text

    def counting(text):
        lengths.append(len(text))
        return encode(text)

    b.encode_text = counting
    huge = words * 80
    query = b.single(Example(prompt=huge, plain_text=True))
    demo = b._cut_text(huge, 384)
    assert query[0][-256:] == encode(huge[:50_000])[:256] and len(query[0]) >= 256
    assert demo == tokenizer.decode(encode(huge[:50_000])[:384])
    assert len(huge) > 1_000_000 and max(lengths) <= 16_384  # never the whole text


def test_a_torch_dataset_is_read_by_index_where_sampled_not_listed_whole():
    """A map-style torch Dataset (rows loaded or tokenized in __getitem__) was listed whole by load_corpus: every
    row read at train start, ~10 min for a million rows at 0.5 ms each."""
    import torch

    texts = domain_texts("law", 50)

    class Rows(torch.utils.data.Dataset):
        reads = 0

        def __len__(self):
            return 100_000

        def __getitem__(self, index):
            Rows.reads += 1
            return {"text": texts[index % 50]}

    corpus = load_corpus(Rows(), "train")
    assert len(corpus) == 100_000 and Rows.reads == 0
    assert corpus[123].prompt == texts[123 % 50] and Rows.reads == 1


def test_a_turn_with_no_content_reads_as_no_text_not_the_word_none():
    from sts_callback.core.data import _content_text

    assert _content_text(None) == ""  # an assistant's tool-call turn: {"content": None, "tool_calls": [...]}
    assert _content_text([{"type": "text", "text": "a"}, {"type": "image"}]) == "a"


def test_a_lone_surrogate_is_named_with_its_example_before_the_tokenizer_sees_it():
    corpus = load_corpus(["a clean text", "half an emoji \ud83d here"], name="legal")
    assert corpus[0].prompt == "a clean text"
    with pytest.raises(STSInputError, match=r"Example 1 of 'legal'.*'\\ud83d' at character 14.*lone surrogate"):
        corpus[1]


def test_a_long_system_prompt_leaves_the_conversations_last_turn_counted(tokenizer):
    b = builder(tokenizer, max_length=256)
    system = {"role": "system", "content": " ".join(domain_texts("chem", 20))}  # far longer than a query
    law, food = domain_texts("law", 1)[0], domain_texts("food", 1)[0]
    pairs = {name: b.pair(Example(prompt=[system, {"role": "user", "content": text}], answer=None), [])
             for name, text in (("law", law), ("food", food))}
    counted = {name: tokenizer.decode(p.base[-p.n_query:]) for name, p in pairs.items()}
    assert law.split()[0] in counted["law"] and food.split()[0] in counted["food"]
    assert counted["law"] != counted["food"]  # the measured tokens are each conversation's own, not the shared start
    for p in pairs.values():
        assert p.base[-p.n_query:] == p.context[-p.n_query:]
    ids, counted = b.single(Example(prompt=[system, {"role": "user", "content": law}], plain_text=True))
    assert ids[0] == tokenizer.bos_token_id and law.split()[0] in tokenizer.decode(ids[len(ids) - len(counted):])


def test_a_conversation_read_as_a_domain_text_can_demonstrate_unless_it_is_blank():
    chat = [{"role": "user", "content": "a question"}, {"role": "assistant", "content": "an answer"}]
    assert Example(prompt=chat, plain_text=True).can_demonstrate
    assert not Example(prompt=[{"role": "user", "content": " "}], plain_text=True).can_demonstrate
    assert not Example(prompt="  \n ", plain_text=True).can_demonstrate
    assert not Example(prompt="a question", answer=" ").can_demonstrate


STRICT_TEMPLATE = (  # Gemma 3's rule: a system turn only first, then user / assistant alternating
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set rest = messages[1:] %}<|system|>"
    "{{ messages[0]['content'] }}<|end|>{% else %}{% set rest = messages %}{% endif %}{% for m in rest %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate') }}"
    "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}")


def test_demonstrations_with_system_turns_render_under_a_template_that_allows_one_system_turn_first():
    """Training renders each conversation alone; the forecast joins several: their system turns must not stop it."""
    tokenizer = make_tokenizer()
    tokenizer.chat_template = STRICT_TEMPLATE
    builder = PromptBuilder(tokenizer, max_query_tokens=32, max_demonstration_tokens=32, max_length=256)
    chat = [{"role": "system", "content": "answer"}, {"role": "user", "content": "law court"},
            {"role": "assistant", "content": "judge ."}]
    example = example_from_record(chat)
    pair = builder.pair(example, [example, example])
    assert pair.context[-pair.n_query:] == pair.base[-pair.n_query:]
    rendered = tokenizer.decode(pair.context)
    assert rendered.count("answer") == 1 and rendered.count("judge") == 2  # one system turn, two answers
    with_user_last = example_from_record({"text": "x"})  # a domain's conversation ending on a user turn joins too
    ending_user = Example(prompt=chat[:2], plain_text=True)
    assert builder.pair(with_user_last, [ending_user, ending_user]).n_query > 0


def test_a_template_that_refuses_any_joined_conversation_names_the_fix():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = "{% if messages|length > 2 %}{{ raise_exception('one exchange only') }}{% endif %}" \
                              "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    builder = PromptBuilder(tokenizer, max_query_tokens=32, max_demonstration_tokens=32, max_length=256)
    example = example_from_record([{"role": "user", "content": "law"}, {"role": "assistant", "content": "court"}])
    with pytest.raises(STSInputError, match="one exchange only.*plain-text demonstrations"):
        builder.pair(example, [example])


def test_a_tool_call_answer_is_demonstrated_with_its_calls():
    """A turn that only calls a tool (content None) is an answer training trains on, not prompt-only data; the
    template renders its tool_calls, and without a template they are its JSON text."""
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "search", "arguments": {"q": "court"}}}]}
    example = example_from_record({"messages": [{"role": "user", "content": "law"}, call]})
    assert example.can_demonstrate and '"name": "search"' in example.answer
    tokenizer = make_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% for c in "
                               "m.get('tool_calls') or [] %}{{ c['function']['arguments']['q'] }}{% endfor %}"
                               "<|end|>{% endfor %}")
    builder = PromptBuilder(tokenizer, max_query_tokens=32, max_demonstration_tokens=32, max_length=256)
    query = example_from_record({"messages": [{"role": "user", "content": "judge"},
                                              {"role": "assistant", "content": "appeal"}]})
    pair = builder.pair(query, [example])
    assert "<|assistant|> court <|end|>" in tokenizer.decode(pair.context)


def test_a_pandas_dataframe_or_series_is_read_as_records_or_texts():
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame({"prompt": ["law", "cook"], "completion": ["court", "bake"]})
    assert [(e.prompt, e.answer) for e in load_corpus(frame)] == [("law", "court"), ("cook", "bake")]
    assert [e.prompt for e in load_corpus(pandas.Series(["a b", "c d"]))] == ["a b", "c d"]


def test_a_tool_call_completion_in_trls_prompt_completion_format_is_rendered_by_the_template():
    from sts_callback.core.data import Corpus
    from sts_callback.pipelines.recipe import training_features

    call = {"role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "search", "arguments": {"q": "court"}}}]}
    record = {"prompt": [{"role": "user", "content": "law"}], "completion": [call]}
    example = example_from_record(record)
    assert example.answer_turn is call and example.can_demonstrate
    tokenizer = make_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% for c in "
                               "m.get('tool_calls') or [] %}{{ c['function']['arguments']['q'] }}{% endfor %}"
                               "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    features = training_features(Corpus("train", [record]), tokenizer, 64, completion_only=True, chat_fallback=False)
    trained = [i for i, label in zip(features[0]["input_ids"], features[0]["labels"]) if label != -100]
    assert tokenizer.decode(trained).split() == ["court", "<|end|>"]  # the call as the template renders it


TOOLS_TEMPLATE = (  # renders the tool schemas first and a thinking switch, as Qwen's and Llama 3.1's templates do
    "{% if tools %}<|user|>{% for t in tools %}{{ t['function']['name'] }} {% endfor %}<|end|>{% endif %}"
    "{% if enable_thinking %}<|user|>why<|end|>{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _tool(name: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": "", "parameters": {}}}


def test_a_records_tools_and_chat_template_kwargs_render_as_trl_renders_them():
    """TRL's SFT and DPO trainers pass a record's ``tools`` (a list, or its JSON text in a dataset column) and its
    ``chat_template_kwargs`` to the chat template: the forecast renders the same text, and a conversation joined from
    several records lists every record's tools."""
    tokenizer = make_tokenizer()
    tokenizer.chat_template = TOOLS_TEMPLATE
    builder = PromptBuilder(tokenizer, max_query_tokens=32, max_demonstration_tokens=32, max_length=256)
    chat = [{"role": "user", "content": "law"}, {"role": "assistant", "content": "court"}]
    query = example_from_record({"messages": chat, "tools": json.dumps([_tool("judge")]),
                                 "chat_template_kwargs": {"enable_thinking": True}})
    demo = example_from_record({"messages": chat, "tools": [_tool("statute")]})
    assert query.template_kwargs == {"enable_thinking": True, "tools": [_tool("judge")]}
    base = tokenizer.decode(builder.single(query)[0])
    assert "judge" in base and "why" in base  # the query alone, as training renders it
    context = tokenizer.decode(builder.pair(query, [demo]).context)
    assert "judge" in context and "statute" in context and context.count("why") == 1
    plain = example_from_record({"messages": chat, "tools": []})
    assert plain.template_kwargs is None and "judge" not in tokenizer.decode(builder.single(plain)[0])
    with pytest.raises(STSInputError, match="'tools' is text that is not JSON"):
        example_from_record({"messages": chat, "tools": "[{name: judge"})
    assert example_from_record({"messages": chat, "tools": " "}).template_kwargs is None  # an empty JSON-text row
    assert example_from_record({"text": "law court", "tools": "pan, oven"}).plain_text  # not a chat: no template


def test_a_records_tools_reach_the_training_features_and_the_preference_pairs():
    from sts_callback.core.data import Corpus
    from sts_callback.pipelines.preference import tokenize_preference
    from sts_callback.pipelines.recipe import training_features

    tokenizer = make_tokenizer()
    tokenizer.chat_template = TOOLS_TEMPLATE
    record = {"prompt": [{"role": "user", "content": "law"}],
              "completion": [{"role": "assistant", "content": "court"}], "tools": [_tool("judge")]}
    features = training_features(Corpus("train", [record]), tokenizer, 64, completion_only=True, chat_fallback=False)
    assert "judge" in tokenizer.decode(features[0]["input_ids"])
    builder = PromptBuilder(tokenizer, max_query_tokens=32, max_demonstration_tokens=32, max_length=256)
    pair = tokenize_preference(builder, {**{k: record[k] for k in ("prompt", "tools")},
                                         "chosen": record["completion"],
                                         "rejected": [{"role": "assistant", "content": "cook"}]}, 0)
    assert "judge" in tokenizer.decode(pair.chosen[0])


def test_a_datasetdict_is_refused_with_the_split_to_pick_not_read_as_domains_named_after_its_splits():
    datasets = pytest.importorskip("datasets")
    from sts_callback.core.data import load_domains

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["law court"]}),
                                   "test": datasets.Dataset.from_dict({"text": ["judge appeal"]})})
    with pytest.raises(STSInputError, match=r"targets is a datasets.DatasetDict.*\{'legal': data\['test'\]\}"):
        load_domains(splits)
    with pytest.raises(STSInputError, match=r"not one dataset for target 'legal': pick a split"):
        load_domains({"legal": splits})
    assert list(load_domains(dict(splits))) == ["train", "test"]  # said so: the splits are the domains


# VLM chat templates (LLaVA-1.5, SmolVLM, Idefics3) read typed content parts only: string content renders empty
TYPED_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{% for part in m['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
STRICT_TYPED_TEMPLATE = (  # one that refuses string content outright
    "{% for m in messages %}{% if m['content'] is string %}{{ raise_exception('typed content only') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'][0]['text'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.mark.parametrize("template", [TYPED_TEMPLATE, STRICT_TYPED_TEMPLATE])
def test_a_template_that_reads_typed_content_parts_only_renders_every_turns_text(template):
    from sts_callback.core.data import Corpus
    from sts_callback.pipelines.preference import prompt_completion_ids
    from sts_callback.pipelines.recipe import training_features
    from sts_callback.pipelines.rollouts import RolloutSettings, _prompt_ids

    tokenizer = make_tokenizer()
    tokenizer.chat_template = template
    b = PromptBuilder(tokenizer, max_query_tokens=32, max_demonstration_tokens=32, max_length=256)
    assert b.typed_content
    typed = [{"role": "user", "content": [{"type": "text", "text": "law court"}]}]
    for prompt in (typed, [{"role": "user", "content": "law court"}]):  # typed or string content, as datasets hold
        query = Example(prompt=prompt, answer=None)
        assert "law court" in tokenizer.decode(b.single(query)[0])
        demo = Example(prompt=[{"role": "user", "content": "cook"}], answer="bake flour")
        assert "bake flour" in tokenizer.decode(b.pair(query, [demo]).context)
    record = {"prompt": [{"role": "user", "content": "law"}], "completion": [{"role": "assistant", "content": "judge"}]}
    features = training_features(Corpus("train", [record]), tokenizer, 64, completion_only=True, chat_fallback=False)
    assert "judge" in tokenizer.decode([i for i, label in zip(features[0]["input_ids"], features[0]["labels"])
                                        if label != -100])
    prompt_ids, completion_ids = prompt_completion_ids(b, record["prompt"], record["completion"])
    assert "law" in tokenizer.decode(prompt_ids) and "judge" in tokenizer.decode(completion_ids)
    assert "law" in tokenizer.decode(_prompt_ids(b, record["prompt"], RolloutSettings(), "prompts"))


def test_an_ordinary_template_renders_string_content_as_it_is():
    for template in (None, TOOLS_TEMPLATE, "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}"
                     "{% else %}{{ m['content'][0]['text'] }}{% endif %}{% endfor %}"):
        tokenizer = make_tokenizer()
        tokenizer.chat_template = template or tokenizer.chat_template
        assert not PromptBuilder(tokenizer, max_query_tokens=8, max_demonstration_tokens=8, max_length=64).typed_content


def test_a_processor_gives_its_tokenizer_with_the_processors_chat_template_leaving_both_as_they_were():
    from tiny import CHAT_TEMPLATE, make_processor

    from sts_callback.core.data import text_tokenizer

    tokenizer = make_tokenizer(chat_template=False)
    assert text_tokenizer(tokenizer) is tokenizer
    processor = make_processor(tokenizer, CHAT_TEMPLATE)
    text = text_tokenizer(processor)
    assert text.chat_template == CHAT_TEMPLATE and tokenizer.chat_template is None and processor.tokenizer is tokenizer
    assert text("law court")["input_ids"] == tokenizer("law court")["input_ids"]
    assert text_tokenizer(make_processor(tokenizer, None)) is tokenizer  # no template of its own: the tokenizer's


def test_a_target_domains_long_prompt_is_cut_before_its_answer_not_the_answer_off(tokenizer):
    """A prompt/completion or multiple-choice domain item longer than max_query_tokens kept its first tokens: the
    prompt's, with none of the answer the domain is about (a chat keeps its last turns)."""
    from sts_callback.core.data import DomainCorpus

    long_prompt = " ".join(domain_texts("law", 6, length=12))
    answer = " " + domain_texts("food", 1, length=8)[0]
    builder = PromptBuilder(tokenizer, max_query_tokens=24, max_demonstration_tokens=16, max_length=256)
    answer_ids = builder.encode_text(answer)
    items = [{"prompt": long_prompt, "completion": answer},
             {"question": long_prompt, "choices": [answer.strip(), "no"], "answer": 0}]
    for item in items:
        domain = DomainCorpus(load_corpus([item], name="d"))
        ids, counted = builder.single(domain[0])
        kept = [token for token, c in zip(ids, counted) if c]
        assert len(kept) <= 24 and kept[-len(answer_ids) + 1:] == answer_ids[-len(answer_ids) + 1:]
        # as a demonstration of its domain too: the answer's end is in the text
        assert answer.strip().split()[-1] in builder._demo_text(domain[0])
    plain = load_corpus([long_prompt], name="texts")[0]  # a plain text keeps its start, as before
    assert builder.single(plain)[0][:len(builder.prefix) + 3] == builder.prefix + builder.encode_text(long_prompt)[:3]


def test_added_tokens_marked_special_are_not_counted():
    """Chat control tokens a tokenizer marks special=True without naming them as special tokens (as Llama 3's
    files declare them) were counted as text, in the latents and the held-out loss."""
    from tiny import CHAT_TEMPLATE, WORDS
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from sts_callback.core.data import special_token_ids

    specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + WORDS + ["?", "."])},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    backend.add_special_tokens([AddedToken(t, special=True) for t in specials])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    markers = set(tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>", "<|end|>"]))
    assert not markers & set(tok.all_special_ids) and markers <= special_token_ids(tok)
    chat = Example(prompt=[{"role": "user", "content": "law court"}, {"role": "assistant", "content": "judge ."}],
                   plain_text=True)
    ids, counted = builder(tok, max_query_tokens=32).single(chat)
    kept = [token for token, c in zip(ids[len(ids) - len(counted):], counted) if c]
    assert tok.convert_ids_to_tokens(kept) == ["law", "court", "judge", "."]


def test_a_held_out_cut_of_a_long_target_item_keeps_its_answer(tokenizer):
    """loss_sequence_tokens cut each held-out text to its first counted tokens: a prompt + answer's were the
    prompt's again, after the cut to max_query_tokens had kept the answer."""
    from sts_callback.core.config import STSConfig
    from sts_callback.pipelines.forecast import ForecastSetup
    from sts_callback.pipelines.monitor import Monitor
    from tiny import TinySAE, make_model

    from sts_callback.core.data import DomainCorpus

    answer = " " + domain_texts("food", 1, length=8)[0]
    items = [{"prompt": " ".join(domain_texts("law", 3, length=12, seed=s)), "completion": answer} for s in range(4)]
    setup = ForecastSetup.create(make_model("llama"), tokenizer, TinySAE(32, 64, hook_name="blocks.1.hook_resid_post"),
                                 STSConfig(max_query_tokens=40, n_shifted=8))
    sequences, _ = Monitor.sample_sequences(DomainCorpus(load_corpus(items, name="d")), setup, 1000, "s",
                                            tokens_each=6)
    answer_ids = setup.builder.encode_text(answer)
    for ids, flags in sequences:
        counted = [token for token, c in zip(ids[len(ids) - len(flags):], flags) if c]
        assert counted == answer_ids[-6:]


def test_a_byte_order_mark_and_json_lines_under_json_are_read_as_written(tmp_path):
    """Windows tools write a UTF-8 byte-order mark (refused as 'Unexpected UTF-8 BOM', or kept as text in a .txt);
    Dataset.to_json writes JSON Lines under .json (refused as 'Extra data')."""
    records = [{"text": "alpha beta"}, {"text": "gamma delta"}]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in records).encode())
    text = tmp_path / "bom.txt"
    text.write_bytes(b"\xef\xbb\xbfalpha beta\n\ngamma delta")
    lines = tmp_path / "lines.json"
    lines.write_text("\n".join(json.dumps(r) for r in records))
    for path in (jsonl, text, lines):
        corpus = load_corpus(str(path))
        assert [corpus[i].prompt for i in range(len(corpus))] == ["alpha beta", "gamma delta"], path
    broken = tmp_path / "broken.json"
    broken.write_text('[{"text": "a"}, oops]')
    with pytest.raises(STSInputError, match="broken.json is not valid JSON"):
        load_corpus(str(broken))


def test_home_folder_paths_and_windows_line_ends_in_plain_text_are_read_as_meant(tmp_path, monkeypatch):
    """forecast() took `~/data.jsonl` for a relative path in the working folder (the callback and the CLI expanded
    it); a .txt written on Windows kept '\\r' inside each text, tokens the model then scored."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "law.jsonl").write_text(json.dumps({"text": "alpha beta"}) + "\n")
    assert load_corpus("~/law.jsonl")[0].prompt == "alpha beta"
    assert load_domains({"law": "~/law.jsonl"})["law"].name == "law"
    (tmp_path / "crlf.txt").write_bytes(b"first line\r\nsecond line\r\n\r\nnext text\r\n")
    corpus = load_corpus("~/crlf.txt")
    assert [corpus[i].prompt for i in range(len(corpus))] == ["first line\nsecond line", "next text"]


def test_a_prompt_completion_demonstration_is_the_text_sft_trains_on():
    """TRL's SFT trains on prompt + completion, nothing between; the demonstrations put a newline there, so the
    in-context shift was read after text the training never holds (and, under a SentencePiece tokenizer, other
    tokens: "?\\n▁Answer" against "?▁Answer")."""
    from tiny import make_sentencepiece_tokenizer

    tokenizer = make_sentencepiece_tokenizer()
    builder = PromptBuilder(tokenizer, max_query_tokens=64, max_demonstration_tokens=64, max_length=256)
    demonstration = load_corpus([{"prompt": "Question: what is two plus two?", "completion": " Answer: four."}])[0]
    query = load_corpus(["what is the law"])[0]
    pair = builder.pair(query, [demonstration])
    trained = tokenizer("Question: what is two plus two? Answer: four.", add_special_tokens=False)["input_ids"]
    head = pair.context[len(builder.prefix):len(pair.context) - pair.n_query - len(builder.separator)]
    assert head == trained


def test_a_dataframe_of_chats_or_with_missing_values_is_read_as_its_dataset_is():
    """Dataset.to_pandas() and read_parquet hold a list column as NumPy arrays and a missing value as NaN: the
    chats were refused ("'messages' must be a list") and a missing completion failed without naming its row."""
    import pandas as pd
    from datasets import Dataset

    chats = [[{"role": "user", "content": "law court"}, {"role": "assistant", "content": "judge"}],
             [{"role": "user", "content": "cook"}, {"role": "assistant", "content": "bake oven"}]]
    dataset = Dataset.from_list([{"messages": chat} for chat in chats])
    frame = dataset.to_pandas()
    assert type(frame["messages"][0]).__module__ == "numpy"  # what pandas holds
    assert [load_corpus(frame)[i] for i in range(2)] == [load_corpus(dataset)[i] for i in range(2)]
    records = [{"prompt": "law court", "completion": " judge"}, {"prompt": "cook", "completion": None}]
    frame = pd.DataFrame({"prompt": ["law court", "cook"], "completion": [" judge", float("nan")]})
    assert [load_corpus(frame)[i] for i in range(2)] == [load_corpus(records)[i] for i in range(2)]


def test_a_conversation_target_is_measured_as_given_tool_calls_and_later_turns_included():
    """A domain's conversation was rebuilt as its prompt + the last assistant turn's text: a tool call came as
    this package's JSON, not as the template renders it, and a tool result or a user turn after it was dropped."""
    from sts_callback.core.data import domain_example

    tokenizer = make_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{% if m.get('tool_calls') %}"
                               "{{ m['tool_calls'][0]['function']['name'] }}{% else %}{{ m['content'] }}{% endif %}"
                               "<|end|>{% endfor %}")
    conversation = [{"role": "user", "content": "add two two"},
                    {"role": "assistant", "content": None,
                     "tool_calls": [{"type": "function", "function": {"name": "sum", "arguments": {"a": 2}}}]},
                    {"role": "tool", "content": "four"}, {"role": "user", "content": "why"}]
    example = domain_example(load_corpus([{"messages": conversation}])[0])
    builder = PromptBuilder(tokenizer, max_query_tokens=64, max_demonstration_tokens=64, max_length=256)
    ids, counted = builder.single(example)
    assert ids == tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False),
                            add_special_tokens=False)["input_ids"]
    # a prompt / completion record whose completion calls a tool: its turn as the template renders it
    record = {"prompt": conversation[:1], "completion": conversation[1:2]}
    assert builder.single(domain_example(load_corpus([record])[0]))[0] == tokenizer(
        tokenizer.apply_chat_template(conversation[:2], tokenize=False), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("keep_end", [False, True])
def test_a_text_cut_inside_a_character_loses_the_character_not_its_bytes(keep_end):
    """A byte-level BPE (Llama 3's, Qwen's, GPT-2's) spells a CJK character in several tokens: cut between them,
    the decoded text held U+FFFD, which re-encodes as three junk tokens that were measured."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["law court judge"] * 5, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    builder = PromptBuilder(tokenizer, max_query_tokens=64, max_demonstration_tokens=64, max_length=256)
    for text in ("law 鬱屈齟齬 court", "law \ufffd 鬱屈齟齬 \ufffd court"):  # scraped text holds U+FFFD of its own
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        cuts = [builder._cut_text(text, n, keep_end) for n in range(1, len(ids))]
        assert all((text.endswith(cut) if keep_end else text.startswith(cut)) for cut in cuts), cuts
        assert all(len(tokenizer(cut, add_special_tokens=False)["input_ids"]) <= n for n, cut in enumerate(cuts, 1))


def test_a_large_jsonl_file_is_not_held_in_memory_as_records(tmp_path):
    """Every record was parsed into Python objects (a few times the file's size) to sample a few thousand tokens;
    the lazily read records must not depend on the file after loading (a temporary file removed, rewritten)."""
    import tracemalloc

    path = tmp_path / "big.jsonl"
    text = " ".join(domain_texts("law", 8))
    with open(path, "w", encoding="utf-8") as file:
        file.write("\ufeff")  # a byte-order mark, as Windows tools write one
        for i in range(20_000):
            file.write(json.dumps({"prompt": f"{i} {text}", "completion": " judge ."}) + ("\n\n" if i == 5 else "\n"))
    (tmp_path / "small.jsonl").write_text('{"text": "law"}\n')
    load_corpus(tmp_path / "small.jsonl")[0]  # the modules it imports on first use are no data
    tracemalloc.start()
    corpus = load_corpus(path)
    examples = [corpus[i] for i in (0, 6, 19_999)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # the file's bytes (every record as Python objects took 3.2 times them)
    assert len(corpus) == 20_000 and peak < 1.3 * path.stat().st_size, (peak, path.stat().st_size)
    assert [e.prompt.split()[0] for e in examples] == ["0", "6", "19999"] and examples[0].answer == " judge ."
    assert corpus._places[6] == f"{path} line 8"  # the blank line counted, as an editor shows it
    path.unlink()  # a file removed (or rewritten) once loaded: the records are those loaded
    assert corpus[6].prompt.split()[0] == "6"
    path.write_text('{"text": "law"}\n{"text": oops}\n')
    with pytest.raises(STSInputError, match=r"big.jsonl:2 is not valid JSON"):
        load_corpus(path)
    path.write_bytes(b'{"text": "law"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(STSInputError, match=r"is not UTF-8 text \(byte 29"):
        load_corpus(path)


def test_a_large_table_file_is_not_held_in_memory_as_records(tmp_path):
    import tracemalloc

    import pyarrow as pa
    import pyarrow.parquet as pq

    text = " ".join(domain_texts("law", 8))
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": [f"{i} {text}" for i in range(20_000)]}), path)
    load_corpus(path)[0]  # the modules it imports on first use are no data
    tracemalloc.start()
    corpus = load_corpus(path)
    examples = [corpus[i] for i in (0, 19_999, -1)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(corpus) == 20_000 and [e.prompt.split()[0] for e in examples] == ["0", "19999", "19999"]
    assert peak < 20_000 * len(text) / 10, peak


def test_a_file_of_records_in_another_layout_is_refused_at_its_first_line(tmp_path):
    """Every record used 'body': the error named whichever line sampling drew first (line 20 or line 10). Loading
    alone reads no record: a GRPO prompt file keeps a reward column 'answer' of numbers or lists."""
    from sts_callback.pipelines.rollouts import prompt_records

    path = tmp_path / "body.jsonl"
    path.write_text("".join(json.dumps({"body": f"law court {i}"}) + "\n" for i in range(30)))
    corpus = load_corpus(path)
    with pytest.raises(STSInputError, match=r"body.jsonl line 1\b"):
        corpus[19]
    prompts = tmp_path / "grpo.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i} + {i} =", "answer": [2 * i, f"{2 * i}.0"]}) + "\n"
                               for i in range(4)))
    assert list(prompt_records(str(prompts)))[1] == {"prompt": "1 + 1 =", "answer": [2, "2.0"]}


def test_real_world_data_files_are_read_or_refused_by_name(tmp_path):
    """A CSV with two 'text' columns lost one silently; a UTF-16 (Excel's "Unicode Text") or latin-1 CSV raised a
    bare UnicodeDecodeError; a .json of one JSON Lines record was refused, and one of many with a broken line was
    blamed on its line 2; a numeric completion was refused without saying where."""
    cases = {"two.csv": ("text,text\nlaw court,judge appeal\n".encode(), r"column\(s\) \['text'\] more than once"),
             "utf16.csv": ("text\nlaw court\nrésumé".encode("utf-16"), r"not UTF-8 text .*iconv -f utf-16"),
             "latin.csv": ("text,résumé\nlaw,x\n".encode("latin-1"), r"not UTF-8 text .*iconv -f latin1"),
             "latin_body.tsv": ("text\nrésumé law\n".encode("latin-1"), r"not UTF-8 text .*iconv -f latin1"),
             "lines.json": ("".join(json.dumps({"text": f"law {i}"}) + "\n" for i in range(9)).encode()
                            + b'{"text": "cut\n', r"lines.json:10 is not valid JSON")}
    for name, (data, error) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(STSInputError, match=error):
            load_corpus(tmp_path / name)[0]
    (tmp_path / "one.json").write_text(json.dumps({"text": "law court"}) + "\n")
    assert [e.prompt for e in load_corpus(tmp_path / "one.json")] == ["law court"]
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["law court"], "test": ["judge"]}))
    with pytest.raises(STSInputError, match="must hold a JSON list"):  # an object of splits is no record
        load_corpus(tmp_path / "splits.json")
    (tmp_path / "math.jsonl").write_text(json.dumps({"prompt": "2 + 2 =", "completion": 4}) + "\n")
    with pytest.raises(STSInputError, match=r"math.jsonl line 1\): its 'completion' is int 4.* as text"):
        load_corpus(tmp_path / "math.jsonl")[0]
