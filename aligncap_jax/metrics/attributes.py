"""Per-attribute accuracy of synthetic captions, parsed with the generator's grammar.

A synthetic caption states one fact in one of its variant's templates
(`aligncap_jax.data.synthetic.Grammar`): the default variant writes "a {size}
{colour} {shape} {relation} a|an {colour} {shape}"; the hard variant
(`synthetic_hard.GRAMMAR`) adds a fill pattern and four paraphrases, one naming
the neighbour first with the inverse relation. The parser is built from the
same `Grammar` object the generator renders with, so the words have one source.
CIDEr rewards the target half of a caption as much as the context half; these
fractions tell them apart:

  attr_size, attr_colour, attr_shape   the target's own attributes
  attr_pattern                         its fill pattern (grammars with patterns)
  attr_relation                        where the target lies w.r.t. its neighbour
  attr_neighbour                       the neighbour's colour and shape, both right
  attr_neighbour_colour/_shape         each alone
  exact_match                          the whole caption (after whitespace/case)
  attr_parsed                          predictions the grammar can read at all

A prediction the grammar cannot read counts as wrong on every attribute. With
several references (boxes repeated in a split; the hard variant's paraphrases),
an attribute is right if it matches any reference's.
"""
from __future__ import annotations

import functools
import re
from typing import Sequence

from aligncap_jax.data import synthetic
from aligncap_jax.data import synthetic_hard

TARGET = ("size", "colour", "shape")
FIELDS = ("size", "colour", "shape", "relation", "n_colour", "n_shape")
GRAMMARS = {"synthetic_regions": synthetic.GRAMMAR, synthetic_hard.NAME: synthetic_hard.GRAMMAR}


def grammar_for(dataset_name: str) -> synthetic.Grammar:
  """The caption grammar of a synthetic dataset (`config.data.name`)."""
  if dataset_name not in GRAMMARS:
    raise ValueError(f"no caption grammar for dataset {dataset_name!r}; known: {sorted(GRAMMARS)}")
  return GRAMMARS[dataset_name]


def _alternatives(words: Sequence[str]) -> str:
  return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


@functools.lru_cache(maxsize=None)
def _compiled(grammar: synthetic.Grammar) -> tuple[tuple[re.Pattern, dict[str, str]], ...]:
  """Per template: (its regex, {relation words: canonical relation})."""
  words = {"size": grammar.sizes, "pattern": grammar.patterns, "colour": grammar.colours,
           "shape": grammar.shapes, "n_colour": grammar.colours, "n_shape": grammar.shapes}
  out = []
  for k, template in enumerate(grammar.templates):
    back = {w: r for r, w in template.relation_words}
    parts = ["^"]
    for literal, field in grammar.slots(k):
      parts.append(re.escape(literal))
      if field in ("a", "n_a"):
        parts.append("an?")
      elif field == "relation":
        parts.append(f"(?P<relation>{_alternatives(back)})")
      elif field is not None:
        parts.append(f"(?P<{field}>{_alternatives(words[field])})")
    parts.append("$")
    out.append((re.compile("".join(parts)), back))
  return tuple(out)


def _normalise(text: str) -> str:
  return " ".join(text.lower().replace(".", " ").split())


def parse_caption(text: str, grammar: synthetic.Grammar = synthetic.GRAMMAR) -> dict[str, str] | None:
  """{field: word} (`grammar.fields`, relation canonical), or None if off-grammar."""
  text = _normalise(text)
  for regex, back in _compiled(grammar):
    m = regex.match(text)
    if m:
      got = m.groupdict()
      got["relation"] = back[got["relation"]]
      return {k: got[k] for k in grammar.fields}
  return None


def attribute_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]],
                       grammar: synthetic.Grammar = synthetic.GRAMMAR) -> dict[str, float]:
  """Fractions in [0, 1] over the targets (see the module docstring)."""
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
  names = ("attr_size", "attr_colour", "attr_shape") + (
      ("attr_pattern",) if grammar.patterns else ()) + (
      "attr_relation", "attr_neighbour", "attr_neighbour_colour", "attr_neighbour_shape",
      "exact_match", "attr_parsed")
  counts = dict.fromkeys(names, 0)
  for pred, refs in zip(predictions, references):
    ref_parses = [p for p in (parse_caption(r, grammar) for r in refs) if p is not None]
    if not ref_parses:
      raise ValueError(f"reference {list(refs)!r} is not a synthetic caption")
    counts["exact_match"] += any(_normalise(pred) == _normalise(r) for r in refs)
    p = parse_caption(pred, grammar)
    if p is None:
      continue
    counts["attr_parsed"] += 1

    def hit(*keys):
      return any(all(p[k] == r[k] for k in keys) for r in ref_parses)

    counts["attr_size"] += hit("size")
    counts["attr_colour"] += hit("colour")
    counts["attr_shape"] += hit("shape")
    if grammar.patterns:
      counts["attr_pattern"] += hit("pattern")
    counts["attr_relation"] += hit("relation")
    counts["attr_neighbour"] += hit("n_colour", "n_shape")
    counts["attr_neighbour_colour"] += hit("n_colour")
    counts["attr_neighbour_shape"] += hit("n_shape")
  n = max(len(predictions), 1)
  return {k: v / n for k, v in counts.items()}
