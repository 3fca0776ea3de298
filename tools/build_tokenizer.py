"""Build the packaged tiny/small text tokenizer from the synthetic cabin corpus.

    python -m tools.build_tokenizer [--out vlacabin_jax/data/tokenizer] [--vocab-size 2048]

A byte-pair-encoding model over sentencepiece-style word pieces (spaces become `▁`, so decoding
restores them; punctuation and digit runs are split off; Chinese phrases merge up to the next
punctuation mark). The alphabet is every
character of every template in `phrases.py` plus printable ASCII, so no generated text ever needs
`<unk>`. Special tokens have fixed ids: `<pad>`=0, `<bos>`=1, `<eos>`=2, `<unk>`=3, `<sep>`=4.
Unused ids up to `--vocab-size` are `<reserved_i>` tokens. The output is deterministic.
"""

from __future__ import annotations

import argparse
import json
import os
import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from vlacabin_jax.data import phrases, world
from vlacabin_jax.data.features import TOKENIZER_DIR
from vlacabin_jax.data.spec import KINDS

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<sep>"]


def corpus(num_samples: int, seed: int = 20240) -> list[str]:
    """Every template filled with every slot value, plus the texts of generated samples."""
    lines = phrases.all_strings()
    for i in range(num_samples):
        s = world.generate(seed, i, KINDS[i % len(KINDS)], image_size=8, num_frames=1, n_mels=8, mel_frames=8)
        lines += [s["text"], *(s["history"] or []), s["explanation"] or ""]
    return [x for x in lines if x]


def build(vocab_size: int = 2048, num_samples: int = 4000) -> Tokenizer:
    lines = corpus(num_samples)
    alphabet = sorted(set("".join(lines)) | set(string.printable.strip()) | {"▁"})
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Words keep their leading "▁"; punctuation and digit runs are pieces of their own, so merges
    # stay inside words and Chinese phrases (no sentence-sized tokens from a repetitive corpus).
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
        pre_tokenizers.Split(Regex(r"[\p{P}\p{S}&&[^▁]]"), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=False)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    # The corpus runs out of merges a little short of the target: fill up with reserved tokens so
    # the size stays a round number that any `tensor` mesh axis divides (the vocab is sharded).
    short = vocab_size - tok.get_vocab_size()
    if short > 0:
        tok.add_special_tokens([f"<reserved_{i}>" for i in range(short)])
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=TOKENIZER_DIR)
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=4000)
    args = ap.parse_args()
    tok = build(args.vocab_size, args.samples)
    os.makedirs(args.out, exist_ok=True)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "bos_token": "<bos>",
              "eos_token": "<eos>", "unk_token": "<unk>", "sep_token": "<sep>", "model_max_length": 4096}
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    print(f"wrote {args.out}: vocab size {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
