"""A character-level tokenizer built locally and saved in Hugging Face format.

One token per character keeps the tiny models' job purely about the skill, and lets
lm-eval's HF backend load it like any other tokenizer (``AutoTokenizer``).
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def char_vocab_size(alphabet: list[str]) -> int:
    """Vocabulary size of build_char_tokenizer(alphabet), without importing transformers
    (the workflow computes it while parsing the Snakefile)."""
    return len(SPECIAL_TOKENS) + len(set(alphabet))


def build_char_tokenizer(alphabet: list[str]):
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(alphabet)))}
    # BPE without merges splits the whole text into single characters.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS["unk_token"]))
    core.decoder = decoders.Fuse()  # join characters without spaces
    # Generation batches pad on the left; 256 characters is far above any prompt.
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, padding_side="left", model_max_length=256, **SPECIAL_TOKENS
    )
    return tok


def save_char_tokenizer(alphabet: list[str], out_dir: Path):
    tok = build_char_tokenizer(alphabet)
    tok.save_pretrained(out_dir)
    return tok
