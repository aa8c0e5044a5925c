"""A small byte-level BPE tokenizer trained on the spot, for the tiny backbones (no download).

Byte-level BPE has no out-of-vocabulary strings, so real dataset text tokenizes too; the corpus
(toy-world text plus a fixed list of common words) keeps toy-world words to one or two tokens.
Training is deterministic: the same corpus and size give the same ids.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from toyworld.world import corpus_lines as toy_corpus_lines

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]

_COMMON_WORDS = (
    "the a an of in on at to is are was what which who where when how many much color colour shape "
    "shapes object objects image picture photo shown show name answer question there this that it "
    "yes no one two three four five six seven eight nine ten capital city country of the nq"
).split()


def corpus_lines() -> list[str]:
    """Text the tiny tokenizer is trained on: the toy world's phrases and some common words."""
    lines = list(toy_corpus_lines()) + [" ".join(_COMMON_WORDS)]
    return sorted(set(lines))


def train_tokenizer(vocab_size: int = 1024, lines: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer that prepends BOS `<s>` like LLaMA and OPT tokenizers do."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines if lines is not None else corpus_lines(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
