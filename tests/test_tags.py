"""Tag vocabulary: lemmatising, stop words, phrases, file round trip."""
from __future__ import annotations

import numpy as np
import pytest

from aligncap_jax.data import tags


def test_content_words_lemmatise_and_drop_stop_words():
  words = tags.content_words("Two MEN are wearing hats, and the man's T-shirt is white.")
  assert words == ["two", "man", "wear", "hat", "man", "shirt", "white"]
  assert tags.content_words("the of and is 42 a") == []
  assert tags.content_words("glasses on the buses") == ["glass", "bus"]


def test_build_vocab_most_frequent_ties_by_word():
  captions = ["a dog on grass", "dogs and a cat", "the cat sat", "zebra", "apple"]
  # dog 2, cat 2, then grass/sit/zebra/apple 1 each (alphabetical).
  assert tags.build_vocab(captions, 4) == ["cat", "dog", "apple", "grass"]
  assert tags.build_vocab(captions, 100)[:2] == ["cat", "dog"]
  with pytest.raises(ValueError, match="size"):
    tags.build_vocab(captions, 0)


def test_tag_ids_words_and_phrases():
  vocab = ["dog", "baseball player", "player", "red shirt", "shirt"]
  ids = tags.tag_ids("Two baseball players in red shirts chase a dog", vocab)
  np.testing.assert_array_equal(ids, [0, 1, 2, 3, 4])
  assert ids.dtype == np.int32
  # Phrase words must be adjacent and in order.
  np.testing.assert_array_equal(tags.tag_ids("a red and white shirt", vocab), [4])
  np.testing.assert_array_equal(tags.tag_ids("player baseball", vocab), [2])
  np.testing.assert_array_equal(tags.tag_ids("dog dog dog", vocab), [0])
  assert tags.tag_ids("", vocab).shape == (0,)


def test_tag_list_replaces_vocab(tmp_path):
  path = tmp_path / "tags.txt"
  path.write_text("# my tags\nBaseball Players\ncat\n\ndog\ncats\n")
  tag_list = tags.read_tag_list(str(path))
  assert tag_list == ["baseball player", "cat", "dog"]
  captions = ["a baseball player", "baseball players and a dog", "a dog", "zebra"]
  assert tags.build_vocab(captions, 5, tag_list=tag_list) == tag_list
  # size < list: the most frequent kept (cat never occurs), list order.
  assert tags.build_vocab(captions, 2, tag_list=tag_list) == ["baseball player", "dog"]
  (tmp_path / "empty.txt").write_text("# nothing\n")
  with pytest.raises(ValueError, match="empty.txt"):
    tags.read_tag_list(str(tmp_path / "empty.txt"))


def test_vocab_file_round_trip(tmp_path):
  vocab = ["dog", "baseball player", "shirt"]
  path = str(tmp_path / "vocab.txt")
  tags.save_vocab(vocab, path)
  assert open(path).read() == "dog\nbaseball player\nshirt\n"
  assert tags.load_vocab(path) == vocab
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    tags.load_vocab(str(tmp_path / "missing.txt"))
  with pytest.raises(ValueError, match="cannot be stored"):
    tags.save_vocab(["a\nb"], path)
