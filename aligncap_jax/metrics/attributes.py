"""Per-attribute accuracy of synthetic captions, parsed with the generator's grammar.

A synthetic caption reads "a {size} {colour} {shape} {relation} a|an {colour}
{shape}" (`aligncap_jax.data.synthetic.caption`). CIDEr rewards the target half
of it as much as the context half; these fractions tell them apart:

  attr_size, attr_colour, attr_shape   the target's own attributes
  attr_relation                        where the target lies w.r.t. its neighbour
  attr_neighbour                       the neighbour's colour and shape, both right
  attr_neighbour_colour/_shape         each alone
  exact_match                          the whole caption (after whitespace/case)
  attr_parsed                          predictions the grammar can read at all

A prediction the grammar cannot read counts as wrong on every attribute. With
several references (boxes repeated in a split), an attribute is right if it
matches any reference's.
"""
from __future__ import annotations

import re
from typing import Sequence

from aligncap_jax.data import synthetic

TARGET = ("size", "colour", "shape")
FIELDS = ("size", "colour", "shape", "relation", "n_colour", "n_shape")


def _alternatives(words: Sequence[str]) -> str:
  return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_GRAMMAR = re.compile(
    rf"^an? (?P<size>{_alternatives(synthetic.SIZES)}) "
    rf"(?P<colour>{_alternatives(synthetic.COLOURS)}) "
    rf"(?P<shape>{_alternatives(synthetic.SHAPES)}) "
    rf"(?P<relation>{_alternatives(synthetic.RELATIONS)}) "
    rf"an? (?P<n_colour>{_alternatives(synthetic.COLOURS)}) "
    rf"(?P<n_shape>{_alternatives(synthetic.SHAPES)})$")


def _normalise(text: str) -> str:
  return " ".join(text.lower().replace(".", " ").split())


def parse_caption(text: str) -> dict[str, str] | None:
  """{size, colour, shape, relation, n_colour, n_shape}, or None if off-grammar."""
  m = _GRAMMAR.match(_normalise(text))
  return m.groupdict() if m else None


def attribute_accuracy(predictions: Sequence[str],
                       references: Sequence[Sequence[str]]) -> dict[str, float]:
  """Fractions in [0, 1] over the targets (see the module docstring)."""
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
  names = ("attr_size", "attr_colour", "attr_shape", "attr_relation", "attr_neighbour",
           "attr_neighbour_colour", "attr_neighbour_shape", "exact_match", "attr_parsed")
  counts = dict.fromkeys(names, 0)
  for pred, refs in zip(predictions, references):
    ref_parses = [p for p in (parse_caption(r) for r in refs) if p is not None]
    if not ref_parses:
      raise ValueError(f"reference {list(refs)!r} is not a synthetic caption")
    counts["exact_match"] += any(_normalise(pred) == _normalise(r) for r in refs)
    p = parse_caption(pred)
    if p is None:
      continue
    counts["attr_parsed"] += 1

    def hit(*keys):
      return any(all(p[k] == r[k] for k in keys) for r in ref_parses)

    counts["attr_size"] += hit("size")
    counts["attr_colour"] += hit("colour")
    counts["attr_shape"] += hit("shape")
    counts["attr_relation"] += hit("relation")
    counts["attr_neighbour"] += hit("n_colour", "n_shape")
    counts["attr_neighbour_colour"] += hit("n_colour")
    counts["attr_neighbour_shape"] += hit("n_shape")
  n = max(len(predictions), 1)
  return {k: v / n for k, v in counts.items()}
