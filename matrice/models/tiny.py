"""Tiny randomly initialised models of every supported family, built offline from transformers
configs, with a small byte-level tokenizer: for tests and benchmarks, never for results."""

from __future__ import annotations

from typing import Iterable

import torch

from matrice.models.adapter import ModelAdapter

TINY_FAMILIES = ("gpt2", "llama", "qwen2", "gemma3", "bloom", "bert", "xlm-roberta")
TINY_MASKED_FAMILIES = ("bert", "xlm-roberta")  # masked LMs; the others are causal
TINY_CAUSAL_FAMILIES = tuple(f for f in TINY_FAMILIES if f not in TINY_MASKED_FAMILIES)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
DEFAULT_CORPUS = (
    "The capital of France is Paris. La capitale de la France est Paris. 法国的首都是巴黎。"
    "フランスの首都はパリです。Ranskan pääkaupunki on Pariisi. Franciaország fővárosa Párizs. "
    "프랑스의 수도는 파리이다. Berlin Rome Madrid Tokyo Helsinki Budapest Seoul Beijing Europe Asia"
)


def tiny_tokenizer(corpus: Iterable[str] = (DEFAULT_CORPUS,), vocab_size: int = 400, causal: bool = True):
    """A byte-level BPE tokenizer (every string is encodable), trained in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    if causal:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        mask_token="<mask>", cls_token="<s>", sep_token="</s>",
    )


def _config(family: str, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        return tf.GPT2Config(n_layer=3, n_embd=32, n_head=4, n_inner=48, n_positions=128, **common)
    if family == "llama":
        return tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=128, **common)
    if family == "qwen2":
        return tf.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=128, **common)
    if family == "gemma3":
        return tf.Gemma3TextConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=1, head_dim=8, sliding_window=4, max_position_embeddings=128,
                                   layer_types=["sliding_attention", "sliding_attention", "full_attention"], **common)
    if family == "bloom":
        return tf.BloomConfig(hidden_size=32, n_layer=3, n_head=4, **common)
    if family == "bert":
        return tf.BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                             max_position_embeddings=128, **common)
    if family == "xlm-roberta":
        return tf.XLMRobertaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                                   max_position_embeddings=130, **common)
    raise ValueError(f"no tiny config for {family!r}; choose from {TINY_FAMILIES}")


def tiny_model(family: str, vocab: int, seed: int = 0, init_scale: float = 0.3):
    """Random weights with a larger init than usual so that probabilities are far from uniform."""
    import transformers as tf

    config = _config(family, vocab)
    config.initializer_range = init_scale
    masked = family in TINY_MASKED_FAMILIES
    torch.manual_seed(seed)
    model = (tf.AutoModelForMaskedLM if masked else tf.AutoModelForCausalLM).from_config(config)
    return model.float().eval()


def tiny_adapter(family: str, seed: int = 0, corpus: Iterable[str] = (DEFAULT_CORPUS,)) -> ModelAdapter:
    masked = family in TINY_MASKED_FAMILIES
    tokenizer = tiny_tokenizer(corpus, causal=not masked)
    return ModelAdapter(tiny_model(family, len(tokenizer), seed), tokenizer)
