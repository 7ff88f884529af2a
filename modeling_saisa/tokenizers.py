"""Hub-free tokenizers for SAISA: a tiny word-level tokenizer built in code, and `<image>` registration.

Tests, the training demo and the checkpoint converter must never reach the Hugging Face Hub, yet they need a real
`transformers` tokenizer (one that saves, reloads with `AutoTokenizer`, pads, decodes and knows its image token).
This module provides exactly that:

- `build_word_tokenizer(words, vocab_size=None, ...)` -> `TokenizersBackend` (= `PreTrainedTokenizerFast`)
  A word-level tokenizer whose ids are predictable, so a test can write the expected `input_ids` by hand:

  ====================  =======================================================================
  id                    token
  ====================  =======================================================================
  0, 1, 2, 3            `<pad>`, `<s>` (BOS), `</s>` (EOS), `<unk>`
  4 ... 4+len(words)-1  `words`, in the given order (duplicates dropped)
  ...                   `<unused_0>`, `<unused_1>`, ... fillers, only when `vocab_size` asks for them
  last (= len - 1)      `<image>`, registered as `tokenizer.image_token` / `tokenizer.image_token_id`
  ====================  =======================================================================

  Text is split like `tokenizers.pre_tokenizers.Whitespace` does (runs of word characters, runs of punctuation;
  spaces and newlines only separate), so `"USER: <image>\\nHi?"` becomes `USER`, `:`, `<image>`, `Hi`, `?`.
  `split_words(text)` returns that split, which is the easy way to collect a vocabulary from sample prompts.
  BOS is prepended by the tokenizer itself (like Llama's), EOS is not appended, padding is on the left.
  Pass `vocab_size=99` to match `tests/tiny.py` (vocab 99, image token id 98, pad 0, bos 1, eos 2).

- `add_image_token(tokenizer, image_token="<image>") -> int`
  Makes any tokenizer (e.g. a real Vicuna / Llama-3 tokenizer during conversion) know `<image>` as a special,
  never-split token exposed as `tokenizer.image_token`, adding it to the vocabulary only if missing. Returns its id;
  if the vocabulary grew, resize the model's embeddings to `len(tokenizer)`.

Example:

```python
>>> from modeling_saisa.tokenizers import build_word_tokenizer, split_words
>>> tok = build_word_tokenizer(split_words("USER: what is this? ASSISTANT: a cat"), vocab_size=99)
>>> tok.image_token, tok.image_token_id, tok.bos_token_id, tok.pad_token_id
('<image>', 98, 1, 0)
>>> tok("USER: <image>\\nwhat is this?").input_ids
[1, 4, 5, 98, 6, 7, 8, 9]
```
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, TokenizersBackend

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "IMAGE_TOKEN",
    "PAD_TOKEN",
    "UNK_TOKEN",
    "add_image_token",
    "build_word_tokenizer",
    "split_words",
]

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)

# The same split as `pre_tokenizers.Whitespace` (its documented regex), so that `split_words` agrees with encoding.
_WORD_RE = re.compile(r"\w+|[^\w\s]+")


def split_words(text: str) -> list[str]:
    """Split `text` into the words the word tokenizer sees (word-character runs and punctuation runs).

    Special tokens such as `<image>` are removed first, because the tokenizer matches them before splitting and they
    must not leak `<`, `image`, `>` into a vocabulary. Order is kept and duplicates are dropped, so the result can be
    handed to `build_word_tokenizer` directly and the ids stay predictable (first occurrence first).
    """
    for special in (*SPECIAL_TOKENS, IMAGE_TOKEN):
        text = text.replace(special, " ")
    return list(dict.fromkeys(_WORD_RE.findall(text)))


def build_word_tokenizer(
    words: Iterable[str],
    vocab_size: int | None = None,
    *,
    add_bos_token: bool = True,
    add_eos_token: bool = False,
    padding_side: str = "left",
    model_max_length: int = 4096,
) -> TokenizersBackend:
    """Build a word-level `TokenizersBackend` with `<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3, `words`, `<image>` last.

    Args:
        words: the vocabulary, in id order; each must be one pre-token (see `split_words`), duplicates are dropped.
        vocab_size: pad the vocabulary with `<unused_k>` fillers so that it has exactly this size and `<image>` gets id
            `vocab_size - 1` (useful to fit a fixed model config, e.g. 99 for `tests/tiny.py`). Must leave room for
            the special tokens, the words and `<image>`.
        add_bos_token: prepend BOS when encoding (Llama/Vicuna behaviour; SAISA's prompt layout assumes it).
        add_eos_token: append EOS when encoding (off for generation prompts).
        padding_side: "left" suits batched generation; collators for training may pass `padding_side="right"`.
        model_max_length: the length the tokenizer reports, so `truncation=True` has a bound.

    Raises:
        ValueError: a word is empty, is a reserved token, is not a single pre-token, or `vocab_size` is too small.
    """
    unique = list(dict.fromkeys(words))
    reserved = {*SPECIAL_TOKENS, IMAGE_TOKEN}
    for word in unique:
        if not isinstance(word, str) or not word:
            raise ValueError(f"Every word must be a non-empty string; got {word!r}.")
        if word in reserved:
            raise ValueError(f"{word!r} is reserved for a special token; leave it out of `words`.")
        if _WORD_RE.findall(word) != [word]:
            raise ValueError(
                f"{word!r} is not a single word for this tokenizer (it splits into {_WORD_RE.findall(word)}); "
                "use split_words(text) to build the vocabulary."
            )
    tokens = [*SPECIAL_TOKENS, *unique]
    if vocab_size is not None:
        n_fill = vocab_size - len(tokens) - 1
        if n_fill < 0:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: {len(SPECIAL_TOKENS)} special tokens + {len(unique)} words + "
                f"{IMAGE_TOKEN} need {len(tokens) + 1}."
            )
        tokens += [f"<unused_{i}>" for i in range(n_fill)]
    tokens.append(IMAGE_TOKEN)

    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # WordPiece's decoder joins tokens with spaces and removes the space before punctuation: readable output.
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    # Fillers must never be produced by splitting user text, and must decode verbatim: mark them as added tokens.
    backend.add_tokens([AddedToken(t, normalized=False) for t in tokens if t.startswith("<unused_")])
    return TokenizersBackend(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        add_bos_token=add_bos_token,
        add_eos_token=add_eos_token,
        padding_side=padding_side,
        model_max_length=model_max_length,
    )


def add_image_token(tokenizer: PreTrainedTokenizerBase, image_token: str = IMAGE_TOKEN) -> int:
    """Register `image_token` on `tokenizer` as a named special token (`tokenizer.image_token`) and return its id.

    Why: the processor expands the image token by string, so it must never be split by the tokenizer and must be
    skipped when decoding; the model finds images by its id. The original SAISA tokenizers have no such token (they
    splice the id -200 in), so the converter calls this. The token is added to the vocabulary only if missing; the
    name survives `save_pretrained` (it is written as `image_token` in `tokenizer_config.json`).
    """
    if getattr(tokenizer, "image_token", None) == image_token:
        token_id = tokenizer.convert_tokens_to_ids(image_token)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            return int(token_id)
    # A named multimodal special token: the same route `extra_special_tokens={"image_token": ...}` takes at init.
    tokenizer._set_model_specific_special_tokens({"image_token": image_token})
    tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if token_id is None or (tokenizer.unk_token_id is not None and token_id == tokenizer.unk_token_id):
        raise ValueError(f"Could not add {image_token!r} to {type(tokenizer).__name__}.")
    return int(token_id)
