"""Tokenizers: the word-level one trained on the synthetic captions, loading, encoding.

Every tokenizer is a `tokenizers.Tokenizer` (a `tokenizer.json` file, or a Hugging
Face folder whose fast tokenizer we take). The synthetic tokenizer is T5-like:
`<pad>` = 0, `</s>` = 1, `<unk>` = 2, lower-casing, punctuation split off (so
"," and "|" are tokens of their own), and `</s>` appended by its post-processor.

LLM caption and prompt ids are encoded WITHOUT the tokenizer's special tokens and
the EOS id from the model config is appended explicitly, so the same code serves
T5's SentencePiece tokenizer (which appends `</s>` itself) and ours. CLIP-text ids
are encoded WITH the special tokens (CLIP's BOS/EOS; our `</s>`), because the
CLIP text tower pools at its EOS.
"""
from __future__ import annotations

import collections
import os
from typing import Iterable

import numpy as np
import tokenizers
from tokenizers import models, normalizers, pre_tokenizers, processors

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
REQUIRED_TOKENS = (",", "|")
TOKENIZER_FILE = "tokenizer.json"


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
  return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                  pre_tokenizers.Punctuation()])


def train_word_level(texts: Iterable[str], *, min_frequency: int = 1) -> tokenizers.Tokenizer:
  """Trains the synthetic dataset's word-level tokenizer.

  Args:
    texts: training captions.
    min_frequency: words seen fewer times map to `<unk>`.

  Returns:
    A tokenizer with ids `<pad>` 0, `</s>` 1, `<unk>` 2, then "," and "|", then
    the words by decreasing count (ties alphabetical), so the ids do not depend
    on the order of `texts`.
  """
  normalizer = normalizers.Lowercase()
  pre = _pre_tokenizer()
  counts: collections.Counter = collections.Counter()
  for text in texts:
    norm = normalizer.normalize_str(text)
    counts.update(piece for piece, _ in pre.pre_tokenize_str(norm))
  vocab = {PAD: 0, EOS: 1, UNK: 2}
  for tok in REQUIRED_TOKENS:
    vocab[tok] = len(vocab)
  for word, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
    if n >= min_frequency and word not in vocab:
      vocab[word] = len(vocab)
  tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
  tok.normalizer = normalizer
  tok.pre_tokenizer = pre
  tok.post_processor = processors.TemplateProcessing(
      single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, 1)])
  tok.add_special_tokens([PAD, EOS, UNK])
  return tok


def load(path: str) -> tokenizers.Tokenizer:
  """Loads a `tokenizer.json` file, or the tokenizer of a Hugging Face folder.

  Raises:
    FileNotFoundError: naming `path` when it is neither.
  """
  if os.path.isfile(path):
    return tokenizers.Tokenizer.from_file(path)
  if os.path.isdir(path):
    json_path = os.path.join(path, TOKENIZER_FILE)
    if os.path.isfile(json_path):
      return tokenizers.Tokenizer.from_file(json_path)
    import transformers  # only for folders that ship a slow (SentencePiece) tokenizer

    fast = transformers.AutoTokenizer.from_pretrained(path, use_fast=True)
    if not getattr(fast, "is_fast", False):
      raise ValueError(f"tokenizer folder {path}: no fast tokenizer could be built")
    return fast.backend_tokenizer
  raise FileNotFoundError(f"tokenizer not found: {path} (expected a {TOKENIZER_FILE} "
                          "file or a Hugging Face folder)")


def token_id(tok: tokenizers.Tokenizer, token: str) -> int:
  """Id of a single-token string, e.g. "," or "|".

  Looks the token up directly, else encodes it and takes the last piece
  (SentencePiece may prefix a word-boundary piece).

  Raises:
    ValueError: when the string does not map to a known token.
  """
  tid = tok.token_to_id(token)
  if tid is not None:
    return int(tid)
  enc = tok.encode(token, add_special_tokens=False)
  unk = tok.token_to_id(UNK)
  if not enc.ids or (unk is not None and enc.ids[-1] == unk):
    raise ValueError(f"tokenizer has no token for {token!r}")
  return int(enc.ids[-1])


def encode_words(tok: tokenizers.Tokenizer, text: str) -> list[int]:
  """Token ids of `text` without any special tokens."""
  return list(tok.encode(text, add_special_tokens=False).ids)


def encode_llm(tok: tokenizers.Tokenizer, text: str, max_len: int, *, eos_id: int,
               pad_id: int) -> tuple[np.ndarray, np.ndarray, bool]:
  """LLM target ids: words + EOS, truncated to `max_len` (EOS kept last), padded.

  Returns:
    (ids int32[max_len], mask int32[max_len], truncated).
  """
  ids = encode_words(tok, text)
  truncated = len(ids) + 1 > max_len
  ids = ids[:max_len - 1] + [eos_id]
  return _pad(ids, max_len, pad_id) + (truncated,)


def encode_clip(tok: tokenizers.Tokenizer, text: str, max_len: int, *,
                pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """CLIP-text ids with the tokenizer's own special tokens, truncated keeping the last.

  Returns:
    (ids int32[max_len], mask int32[max_len]).
  """
  ids = list(tok.encode(text, add_special_tokens=True).ids)
  if len(ids) > max_len:
    ids = ids[:max_len - 1] + ids[-1:]
  return _pad(ids, max_len, pad_id)


def _pad(ids: list[int], max_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  out = np.full((max_len,), pad_id, np.int32)
  mask = np.zeros((max_len,), np.int32)
  out[:len(ids)] = ids
  mask[:len(ids)] = 1
  return out, mask
