"""Multiple-choice scoring runs the LM head only where a choice token is predicted: the scores of the full logits,
without a [choices x length x vocab] tensor."""

import pytest
import torch
from tiny import domain_texts, make_model, make_tokenizer, scaling_model

from sts_callback.core import heldout, multiple_choice
from sts_callback.core.multiple_choice import CHOICE_FORMAT, PROMPT_FORMAT, choice_scores

CHOICES = ["court judge appeal", "sugar", "python code function return", "cell"]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def question(n=6, seed=0):
    return " ".join(domain_texts("law", n, length=12, seed=seed))


def full_logits_scores(model, tokenizer, item, normalize=True):
    """Reference: each choice alone (no padding), the full ``model(...).logits``, float64 log-softmax."""
    prompt = tokenizer(PROMPT_FORMAT.format(question=item["question"]))["input_ids"]
    scores = []
    with torch.no_grad():
        for choice in item["choices"]:
            cont = tokenizer(CHOICE_FORMAT.format(choice=choice), add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([prompt + cont])).logits[0, len(prompt) - 1: -1]
            total = float(torch.log_softmax(logits.double(), -1)[torch.arange(len(cont)), torch.tensor(cont)].sum())
            scores.append(total / len(cont) if normalize else total)
    return scores


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "peft", "granite"])
def test_choice_scores_equal_the_full_logits(tokenizer, arch, monkeypatch):
    if arch == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights=False))
    elif arch == "granite":  # divides its logits by logits_scaling: the full forward measures it
        model = scaling_model("Granite", logits_scaling=8.0)
    else:
        model = make_model(arch)
        if arch == "gemma3":
            model.config.final_logit_softcapping = 3.0  # small, so that the cap matters
    model.eval()
    assert (heldout.split_head(model) is None) == (arch == "granite")
    monkeypatch.setattr(multiple_choice, "HEAD_CHUNK", 3)  # several chunks of the answer positions
    item = {"question": question(), "choices": CHOICES, "answer": 0}
    for normalize in (True, False):
        measured = choice_scores(model, tokenizer, item, normalize=normalize)
        reference = full_logits_scores(model, tokenizer, item, normalize=normalize)
        assert measured == pytest.approx(reference, rel=1e-5, abs=1e-5)


def test_the_head_runs_only_at_the_answer_positions(tokenizer):
    # a large vocabulary, where [choices x length x vocab] logits would be the pass's largest tensor
    model = make_model("llama", vocab_size=32768).eval()
    rows, bodies = [], []
    model.lm_head.register_forward_hook(lambda module, inputs, output: rows.append(output.shape[:-1].numel()))
    model.model.register_forward_hook(lambda module, inputs, output: bodies.append(inputs))
    item = {"question": question(20), "choices": CHOICES, "answer": 0}
    choice_scores(model, tokenizer, item)
    answer_tokens = sum(len(tokenizer(CHOICE_FORMAT.format(choice=c), add_special_tokens=False)["input_ids"])
                        for c in CHOICES)
    prompt_tokens = len(tokenizer(PROMPT_FORMAT.format(question=item["question"]))["input_ids"])
    assert prompt_tokens > 150 and answer_tokens == 9
    assert sum(rows) == answer_tokens and max(rows) <= multiple_choice.HEAD_CHUNK
    assert len(bodies) == 1  # one forward of the body for all the choices (ranks stay in lockstep)
    model.train()
    choice_scores(model, tokenizer, item)
    assert model.training  # the caller's mode is restored


def test_under_autocast_the_scores_are_the_full_forwards_under_it(tokenizer):
    # a trainer's re-check runs the scoring under its autocast; the body and the head run under it as the full
    # forward did (not in float32, which the held-out loss chooses by its own setting)
    model = make_model("llama").eval()
    item = {"question": question(), "choices": CHOICES, "answer": 0}
    exact = torch.tensor(choice_scores(model, tokenizer, item))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured = torch.tensor(choice_scores(model, tokenizer, item))
        reference = torch.tensor(full_logits_scores(model, tokenizer, item), dtype=torch.float32)
    assert not torch.allclose(measured, exact, rtol=1e-5, atol=1e-5)  # autocast took effect
    torch.testing.assert_close(measured, reference, rtol=1e-3, atol=1e-3)


def test_an_item_longer_than_the_models_positions_is_scored_on_the_questions_end():
    """A 40-token question for a model of 32 positions: learned positions failed with an IndexError (a device
    assert on a GPU); the question is cut from the left as the held-out loss keeps a text's end."""
    import transformers as tf
    from tiny import make_tokenizer

    from sts_callback.core.errors import STSInputError
    from sts_callback.core.multiple_choice import choice_scores

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2,
                                             n_head=4)).eval()
    words = "law court judge contract statute appeal code function".split()
    item = {"question": " ".join(words * 5), "choices": ["cook bake", "cell protein gene"], "answer": 0}
    scores = choice_scores(model, tokenizer, item)
    cut = {**item, "question": " ".join((words * 5)[-26:])}  # what fits: BOS, 26 words, "Answer:" (2), 3 tokens
    assert scores == pytest.approx(choice_scores(model, tokenizer, cut), abs=1e-6)
    with pytest.raises(STSInputError, match="no room for the question"):
        choice_scores(model, tokenizer, {**item, "choices": ["cook " * 40, "bake"]})
