"""Tag vocabulary and per-caption tag ids (DESIGN.md section 5 step 5, section 10).

Text is normalised the same way everywhere: lower-cased, split into runs of
letters and digits (`"T-shirt's"` -> `t`, `shirt`, `s`), each token lemmatised
with `simplemma` (English; no downloads). A tag is a sequence of such lemmas
(one for a word, several for a phrase such as `"baseball player"`), stored in
the vocabulary file as its lemmas joined by single spaces, one tag per line.

Content words (what `build_vocab` counts) are the lemmas that are not stop
words (`stopwords_en.txt`, checked on the token and on its lemma), have at
least two characters and contain a letter.
"""
from __future__ import annotations

import collections
import functools
import pathlib
import re
from collections.abc import Iterable, Sequence

import numpy as np
import simplemma

_TOKEN = re.compile(r"[a-z0-9]+")
STOPWORDS_PATH = pathlib.Path(__file__).with_name("stopwords_en.txt")


@functools.cache
def stopwords() -> frozenset[str]:
  """The shipped English stop-word list."""
  lines = STOPWORDS_PATH.read_text(encoding="utf-8").splitlines()
  return frozenset(l.strip() for l in lines if l.strip() and not l.startswith("#"))


@functools.lru_cache(maxsize=200_000)
def _lemma(token: str) -> str:
  return simplemma.lemmatize(token, lang="en").lower()


def lemmas(text: str) -> list[str]:
  """Lower-cased lemmas of every token of `text`, stop words included."""
  return [_lemma(t) for t in _TOKEN.findall(text.lower())]


def _is_content(token: str, lemma: str) -> bool:
  stop = stopwords()
  return (token not in stop and lemma not in stop and len(lemma) >= 2
          and any(c.isalpha() for c in lemma))


def content_words(caption: str) -> list[str]:
  """Lemmatised content words of a caption, in caption order (repeats kept).

  Args:
    caption: free text.

  Returns:
    e.g. `"Two men are wearing hats"` -> `["two", "man", "wear", "hat"]`.
  """
  out = []
  for token in _TOKEN.findall(caption.lower()):
    lemma = _lemma(token)
    if _is_content(token, lemma):
      out.append(lemma)
  return out


def normalise_tag(tag: str) -> str:
  """A tag as stored in the vocabulary: its lemmas joined by single spaces."""
  return " ".join(lemmas(tag))


def read_tag_list(path: str) -> list[str]:
  """A user tag list (one word or phrase per line, `#` comments), normalised.

  Raises:
    ValueError: naming the file when it holds no tags.
  """
  tags, seen = [], set()
  for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines():
    if not line.strip() or line.lstrip().startswith("#"):
      continue
    tag = normalise_tag(line)
    if tag and tag not in seen:
      seen.add(tag)
      tags.append(tag)
  if not tags:
    raise ValueError(f"tag list file {path} holds no tags")
  return tags


class TagMatcher:
  """Finds vocabulary tags (words and phrases) in captions.

  Attributes:
    vocab: the tags, in vocabulary (id) order.
  """

  def __init__(self, vocab: Sequence[str]):
    self.vocab = list(vocab)
    self._by_first: dict[str, list[tuple[tuple[str, ...], int]]] = {}
    for index, tag in enumerate(self.vocab):
      words = tuple(tag.split())
      if not words:
        raise ValueError(f"empty tag at vocabulary index {index}")
      self._by_first.setdefault(words[0], []).append((words, index))

  def __call__(self, caption: str) -> np.ndarray:
    """int32[k]: ids of the tags occurring in `caption` as whole lemma runs, sorted."""
    seq = lemmas(caption)
    found = set()
    for start, word in enumerate(seq):
      for words, index in self._by_first.get(word, ()):
        if tuple(seq[start:start + len(words)]) == words:
          found.add(index)
    return np.array(sorted(found), np.int32)

  def count(self, captions: Iterable[str]) -> np.ndarray:
    """int64[len(vocab)]: how many captions contain each tag."""
    counts = np.zeros(len(self.vocab), np.int64)
    for caption in captions:
      counts[self(caption)] += 1
    return counts


@functools.lru_cache(maxsize=4)
def _matcher(vocab: tuple[str, ...]) -> TagMatcher:
  return TagMatcher(vocab)


def tag_ids(caption: str, vocab: Sequence[str]) -> np.ndarray:
  """Vocabulary ids of the tags found in a caption.

  Args:
    caption: free text.
    vocab: tags as stored by `save_vocab` (lemmas joined by spaces).

  Returns:
    int32[k], unique and sorted by vocabulary index.
  """
  return _matcher(tuple(vocab))(caption)


def build_vocab(captions: Iterable[str], size: int, *,
                tag_list: Sequence[str] | None = None) -> list[str]:
  """The tag vocabulary of a training caption set.

  Args:
    captions: the training captions.
    size: number of tags kept.
    tag_list: optional user tags (words or phrases, e.g. from
      `read_tag_list`), which replace the content words as candidates: the
      `size` tags found in the most captions are kept (ties by list order), in
      list order.

  Returns:
    Without `tag_list`: the `size` most frequent content words (count over all
    occurrences), most frequent first, ties by word.
  """
  if size < 1:
    raise ValueError(f"tag vocabulary size must be >= 1, got {size}")
  if tag_list is not None:
    tags = [normalise_tag(t) for t in tag_list]
    tags = list(dict.fromkeys(t for t in tags if t))
    if len(tags) <= size:
      return tags
    counts = TagMatcher(tags).count(captions)
    keep = sorted(np.argsort(-counts, kind="stable")[:size].tolist())
    return [tags[i] for i in keep]
  counter = collections.Counter()
  for caption in captions:
    counter.update(content_words(caption))
  ranked = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
  return [word for word, _ in ranked[:size]]


def save_vocab(vocab: Sequence[str], path: str) -> None:
  """Writes one tag per line (UTF-8)."""
  for i, tag in enumerate(vocab):
    if not tag or "\n" in tag or tag != tag.strip():
      raise ValueError(f"tag {i} ({tag!r}) cannot be stored one per line")
  pathlib.Path(path).write_text("".join(t + "\n" for t in vocab), encoding="utf-8")


def load_vocab(path: str) -> list[str]:
  """Reads a file written by `save_vocab`.

  Raises:
    FileNotFoundError / ValueError: naming the file (missing, empty, blank line).
  """
  p = pathlib.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"tag vocabulary file {path} does not exist")
  lines = p.read_text(encoding="utf-8").splitlines()
  for i, line in enumerate(lines):
    if not line.strip():
      raise ValueError(f"tag vocabulary file {path}: line {i + 1} is blank")
  if not lines:
    raise ValueError(f"tag vocabulary file {path} is empty")
  return lines
