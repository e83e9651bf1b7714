"""Tiny models, tokenizers and SAEs built in memory (no downloads) for the tests."""

from __future__ import annotations

import torch
from torch import nn

WORDS = (
    "the a of and to in is was for on with as by at from law court judge contract statute appeal "
    "code function return class import def loop variable error python compile "
    "cell protein gene enzyme dna molecule reaction acid chemistry energy "
    "goal match team player score season coach league win ball "
    "cook bake flour sugar oven recipe salt butter egg pan "
    "what why how who when answer question solve number add sum two three four five"
).split()

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
)

DOMAIN_WORDS = {
    "law": "law court judge contract statute appeal".split(),
    "code": "code function return class import def loop variable error python compile".split(),
    "chem": "cell protein gene enzyme dna molecule reaction acid chemistry energy".split(),
    "sport": "goal match team player score season coach league win ball".split(),
    "food": "cook bake flour sugar oven recipe salt butter egg pan".split(),
}


def make_tokenizer(chat_template: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS + [str(i) for i in range(10)] + ["?", ".", ","])}
    vocab["\n"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers import processors

    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"],
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_sentencepiece_tokenizer(vocab_size: int = 300):
    """Llama 2's tokenizer class on a BPE vocabulary trained here: its decoder strips the first space of what it
    decodes (so text decoded in pieces loses the spaces at their joins), unlike the word-level one above."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    texts = [" ".join(WORDS)] * 20 + ["Question: what is two plus two? Answer: four.\n\n"] * 5
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size,
                                                           special_tokens=["<unk>", "<s>", "</s>"]))
    state = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = LlamaTokenizer(vocab=state["vocab"], merges=merges, bos_token="<s>", eos_token="</s>",
                               unk_token="<unk>")
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def make_model(arch: str = "llama", vocab_size: int = 128, hidden: int = 32, layers: int = 3, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif arch == "gemma2":
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, head_dim=8))
    elif arch == "gemma3":
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**common, head_dim=8))
    elif arch == "gemma3_multimodal":
        text = tf.Gemma3TextConfig(**common, head_dim=8)
        vision = tf.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14)
        config = tf.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                                 image_token_index=vocab_size - 1, boi_token_index=vocab_size - 2,
                                 eoi_token_index=vocab_size - 3)
        model = tf.Gemma3ForConditionalGeneration(config)
    elif arch in ("llava", "mllama", "paligemma"):  # vision-language models trained on text (a vision tower unused)
        model = _vlm(arch, common, vocab_size)
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4,
                                                 n_positions=512, bos_token_id=1, eos_token_id=2))
    else:
        raise ValueError(arch)
    model.eval()
    return model


class TinySAE(nn.Module):
    """A ReLU SAE with random weights: encode(x) = relu((x - b_dec) W_enc + b_enc)."""

    def __init__(self, d_in: int, d_sae: int, hook_name: str | None = None, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.W_enc = nn.Parameter(torch.randn(d_in, d_sae, generator=generator) / d_in ** 0.5)
        self.b_enc = nn.Parameter(torch.randn(d_sae, generator=generator) * 0.1)
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.W_dec = nn.Parameter(self.W_enc.detach().T.clone())
        self.d_in, self.d_sae = d_in, d_sae
        self.hook_name = hook_name
        self.encode_calls = 0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.encode_calls += 1
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)


def save_sae_lens_sae(path, d_in: int = 32, d_sae: int = 64, hook_name: str = "blocks.1.hook_resid_post"):
    """A sae-lens StandardSAE with seeded random weights, saved to ``path`` as sae-lens saves one (what a path
    given as ``sae=`` / ``sae:`` loads)."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook_name)))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    sae.save_model(path)
    return path


def domain_texts(domain: str, n: int = 20, length: int = 12, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(f"{domain}:{seed}")
    words = DOMAIN_WORDS[domain] + ["the", "a", "of", "and", "is"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(length // 2, length))) + " ." for _ in range(n)]


class ExactSAE(nn.Module):
    """A lossless 'SAE' (latents = [relu(x), relu(-x)], decode = their difference): fraction of variance
    unexplained 0 on any input. ``noise`` adds a fixed random error to the decoder (a poor fit)."""

    def __init__(self, d_in: int, hook_name: str | None = None, noise: float = 0.0, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.W_enc = nn.Parameter(torch.cat([torch.eye(d_in), -torch.eye(d_in)], dim=1))
        self.W_dec = nn.Parameter(self.W_enc.detach().T.clone()
                                  + noise * torch.randn(2 * d_in, d_in, generator=generator))
        self.d_in, self.d_sae, self.hook_name = d_in, 2 * d_in, hook_name

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W_enc)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec


def record_sts_writes() -> list[str]:
    """The paths this process writes under an STS folder from now on (open for writing, rename of atomic saves),
    seen by an audit hook: how the distributed workers show that only rank 0 writes."""
    import os
    import sys

    written: list[str] = []

    def audit(event, args):
        if event == "open" and "/sts" in str(args[0]):
            path, mode, flags = args
            writing = any(c in str(mode) for c in "wax+") if mode else bool(flags & (os.O_WRONLY | os.O_RDWR))
            if writing:  # open(path, "w") has a mode; os.open(path, os.O_WRONLY | ...) only flags
                written.append(str(path))
        elif event == "os.rename" and "/sts" in str(args[1]):
            written.append(str(args[1]))

    sys.addaudithook(audit)
    return written


def scaling_model(arch: str, **scaling):
    """A tiny model of an architecture that scales its logits (Granite ``logits_scaling``, Cohere ``logit_scale``),
    its logits as large as a trained model's, so that the scaling matters."""
    import transformers as tf

    config = getattr(tf, f"{arch}Config")(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, **scaling)
    torch.manual_seed(0)
    model = getattr(tf, f"{arch}ForCausalLM")(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(50)
    return model


def _vlm(arch: str, common: dict, vocab_size: int):
    import transformers as tf

    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    if arch == "llava":
        return tf.LlavaForConditionalGeneration(tf.LlavaConfig(
            vision_config=tf.CLIPVisionConfig(**vision).to_dict(), text_config=tf.LlamaConfig(**common).to_dict(),
            image_token_index=vocab_size - 1))
    if arch == "mllama":  # text layer 1 is a cross-attention layer, which text-only input skips
        text = tf.MllamaTextConfig(**{**common, "num_hidden_layers": 4}, cross_attention_layers=[1],
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        vision = dict(vision, num_global_layers=1, vision_output_dim=32, intermediate_layers_indices=[0],
                      max_num_tiles=1, supported_aspect_ratios=[[1, 1]])
        return tf.MllamaForConditionalGeneration(tf.MllamaConfig(vision_config=vision, text_config=text.to_dict(),
                                                                 image_token_index=vocab_size - 1))
    # PaliGemma: a prefix-LM (text_config.use_bidirectional_attention=True by default)
    return tf.PaliGemmaForConditionalGeneration(tf.PaliGemmaConfig(
        vision_config=tf.SiglipVisionConfig(**vision).to_dict(),
        text_config=tf.GemmaConfig(**common, head_dim=8).to_dict(), image_token_index=vocab_size - 1,
        projection_dim=32))


def make_processor(tokenizer, chat_template: str | None):
    """A LLaVA processor around ``tokenizer`` holding ``chat_template`` (VLM checkpoints often ship the template on
    the processor only)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>", "<image>"]})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                          patch_size=14, image_token="<image>")
