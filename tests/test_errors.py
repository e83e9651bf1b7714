"""Bad input gets an error that names the problem and the fix, before any long computation."""

import pytest
import torch
from tiny import TinySAE, domain_texts, make_model, make_tokenizer

from sts_callback import STSConfig, STSConfigError, STSInputError, STSNumericalError, forecast


@pytest.fixture(scope="module")
def model():
    return make_model("llama")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def sae(d_in=32, d_sae=64, layer=1):
    return TinySAE(d_in, d_sae, hook_name=f"blocks.{layer}.hook_resid_post")


CONFIG = STSConfig(n_shifted=8, shift_tokens=100, domain_tokens=60)
TRAIN = domain_texts("law", 20)
TARGETS = {"chem": domain_texts("chem", 20)}


def test_sae_width_does_not_match_model(model, tokenizer):
    with pytest.raises(STSInputError, match="d_in=48 does not match the model's hidden size 32"):
        forecast(model, tokenizer, sae(d_in=48), TRAIN, TARGETS, CONFIG)


def test_layer_out_of_range(model, tokenizer):
    with pytest.raises(STSInputError, match="Layer 7 does not exist"):
        forecast(model, tokenizer, sae(layer=7), TRAIN, TARGETS, CONFIG)


def test_layer_conflict_between_config_and_sae(model, tokenizer):
    with pytest.raises(STSConfigError, match="layer=0 but the SAE was trained on layer 1"):
        forecast(model, tokenizer, sae(), TRAIN, TARGETS, CONFIG.replace(layer=0))


def test_sae_without_layer_needs_config_layer(model, tokenizer):
    anonymous = TinySAE(32, 64)
    with pytest.raises(STSConfigError, match=r"set STSConfig\(layer=...\)"):
        forecast(model, tokenizer, anonymous, TRAIN, TARGETS, CONFIG)
    assert forecast(model, tokenizer, anonymous, TRAIN, TARGETS, CONFIG.replace(layer=1)).settings["layer"] == 1


def test_empty_domain(model, tokenizer):
    with pytest.raises(STSInputError, match="'empty' is empty"):
        forecast(model, tokenizer, sae(), TRAIN, {"empty": []}, CONFIG)
    with pytest.raises(STSInputError, match="'blank' is empty or has no countable tokens"):
        forecast(model, tokenizer, sae(), TRAIN, {"blank": ["", "<eos>"]}, CONFIG)


def test_domain_with_fewer_tokens_than_a_query(model, tokenizer):
    with pytest.raises(STSInputError, match="'tiny' has only 2 tokens.*add texts"):
        forecast(model, tokenizer, sae(), TRAIN, {"tiny": ["law court"]}, CONFIG)


def test_empty_training_data(model, tokenizer):
    with pytest.raises(STSInputError, match="'train' is empty"):
        forecast(model, tokenizer, sae(), [], TARGETS, CONFIG)


def test_chat_input_without_chat_template(model):
    plain_tokenizer = make_tokenizer(chat_template=False)
    chats = [[{"role": "user", "content": t}, {"role": "assistant", "content": t}] for t in TRAIN]
    with pytest.raises(STSInputError, match="no chat template.*chat_fallback=True"):
        forecast(model, plain_tokenizer, sae(), chats, TARGETS, CONFIG)
    result = forecast(model, plain_tokenizer, sae(), chats, TARGETS, CONFIG.replace(chat_fallback=True))
    assert result.shift_tokens > 0


def test_dataset_without_text_columns(model, tokenizer):
    from datasets import Dataset

    with pytest.raises(STSInputError, match=r"columns \['body', 'id'\].*rename_column"):
        forecast(model, tokenizer, sae(), Dataset.from_dict({"body": TRAIN, "id": list(range(20))}), TARGETS, CONFIG)


def test_prompt_only_data_needs_demonstrations(model, tokenizer):
    prompts = [{"prompt": t} for t in TRAIN]
    with pytest.raises(STSInputError, match="no examples with answers.*demonstrations="):
        forecast(model, tokenizer, sae(), prompts, TARGETS, CONFIG)
    demos = [{"prompt": t, "completion": t} for t in domain_texts("law", 5, seed=9)]
    assert forecast(model, tokenizer, sae(), prompts, TARGETS, CONFIG, demonstrations=demos).shift_tokens > 0


def test_unreadable_record(model, tokenizer):
    with pytest.raises(STSInputError, match=r"example 1 of 'train'.*\['question'\]"):
        forecast(model, tokenizer, sae(), ["law court", {"question": "x"}] * 3, TARGETS,
                 CONFIG.replace(shift_tokens=10_000))


def test_nan_in_activations_names_the_batch(tokenizer):
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(STSNumericalError, match="NaN or inf in the residual stream at layer 1 in batch 0"):
        forecast(model, tokenizer, sae(), TRAIN, TARGETS, CONFIG)


def test_n_larger_than_sae_width(model, tokenizer):
    with pytest.raises(STSConfigError, match="n_shifted=100 is larger than the SAE width 64"):
        forecast(model, tokenizer, sae(), TRAIN, TARGETS, STSConfig(shift_tokens=100))


@pytest.mark.parametrize("field,value,message", [
    ("n_shifted", 0, "n_shifted must be an integer >= 1"),
    ("shift_tokens", -5, "shift_tokens must be an integer >= 16"),
    # below one short query the forecast failed at train start, blaming the data ("add texts to it")
    ("shift_tokens", 10, "shift_tokens must be an integer >= 16, got 10; set shift_tokens=16 or more"),
    ("domain_tokens", 1, "domain_tokens must be an integer >= 16"),
    ("batch_size", 2.5, "batch_size must be an integer"),
    ("ranking", "best", "ranking='best' is not a score variant"),
    ("sae_dtype", "int8", "sae_dtype='int8'"),
    ("max_length", 100, "max_length=100 leaves no room"),
])
def test_config_validation_names_the_field(field, value, message):
    with pytest.raises(STSConfigError, match=message):
        STSConfig(**{field: value})


def test_icl_ranking_needs_icl():
    with pytest.raises(STSConfigError, match="needs compute_icl=True"):
        STSConfig(compute_icl=False)
    with pytest.raises(STSConfigError, match="Unknown STSConfig field.*Did you mean 'n_shifted' .not 'n_shfted'.?"):
        STSConfig.from_dict({"n_shfted": 3})  # a typo (as in `sts ... --set n_shfted=3`) gets its likely fix


def test_targets_shape_errors(model, tokenizer):
    with pytest.raises(STSInputError, match="No target domains"):
        forecast(model, tokenizer, sae(), TRAIN, {}, CONFIG)
    with pytest.raises(STSInputError, match=r"neither an existing file nor a registered domain\. Pass"):
        forecast(model, tokenizer, sae(), TRAIN, ["no_such_domain_xyz"], CONFIG)
    with pytest.raises(STSInputError, match=r"'pyhton_code' .*registered domain \(did you mean 'python_code'\?\)"):
        forecast(model, tokenizer, sae(), TRAIN, ["pyhton_code"], CONFIG)  # a typo gets its likely fix
