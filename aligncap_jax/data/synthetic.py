"""Procedural region-captioning scenes: the embedded `synthetic_regions` dataset.

Each image holds a few coloured shapes (one of `COLOURS` x `SHAPES` x `SIZES`)
on a plain or lightly textured background. Every shape is one region; its caption
names its attributes and the relation to its nearest neighbour ("a small red
circle left of a blue square"), so the GOD context views carry the signal the
caption needs. `objects` is a simulated detector run over the scene: the shapes'
class with noisy boxes, some misses and a few low-score false positives.

Everything is a pure function of `(seed, split, image index)`, so a build is
reproducible and images can be generated in any order.

The caption words and templates are a `Grammar` (`GRAMMAR` here), which the
attribute parser (`aligncap_jax.metrics.attributes`) reads too. The hard
variant, `synthetic_hard.py`, reuses this module's relation rule, detector and
record layout with its own grammar and scenes.

The TFDS builder writes the record layout shared with the real datasets
(issue #5): `image` (PNG), `image_id`, `width`, `height`, `regions` =
Sequence{`id`, `bbox` float32[4] x1,y1,x2,y2, `caption`}, `objects` =
Sequence{`label`, `bbox`, `score`}.
"""
from __future__ import annotations

import dataclasses
import string

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
# Shape radius (half the box side) as a fraction of the image side, per size.
_RADIUS = {"small": (0.07, 0.09), "large": (0.14, 0.17)}
MIN_OBJECTS = 2
MAX_OBJECTS = 4
_OUTLINE_PX = 2          # fixed in pixels: its relative width tells size in a crop
_BOX_JITTER_PX = 1.0     # region boxes are the shape boxes +- this
_MISS_PROB = 0.1         # simulated detector: missed objects
_FALSE_POSITIVE_RATE = 0.5   # expected spurious detections per image
_SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}
_IMAGE_ID_STRIDE = 1_000_000    # image_id = split code * stride + index + 1
_REGION_ID_STRIDE = 16          # region_id = image_id * stride + object index


@dataclasses.dataclass(frozen=True)
class Template:
  """One way of writing a region's fact as a caption.

  Attributes:
    text: words and fields: `{a}` / `{n_a}` (the article of the next word),
      `{size}`, `{pattern}`, `{colour}`, `{shape}` (the target), `{relation}`,
      `{n_colour}`, `{n_shape}` (the neighbour).
    relation_words: (relation of the target w.r.t. its neighbour, the words
      `{relation}` writes for it) for each of `RELATIONS`; a template that names
      the neighbour first writes the inverse relation.
  """
  text: str
  relation_words: tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class Grammar:
  """The words and templates of a synthetic variant's captions: the one source
  both the generator (`render`) and the attribute parser
  (`aligncap_jax.metrics.attributes`) read.

  Attributes:
    sizes, colours, shapes: the target's attribute words (neighbours use
      colours and shapes).
    patterns: fill pattern words; empty when captions name no pattern.
    templates: the paraphrases of one fact.
  """
  sizes: tuple[str, ...]
  colours: tuple[str, ...]
  shapes: tuple[str, ...]
  patterns: tuple[str, ...]
  templates: tuple[Template, ...]

  @property
  def fields(self) -> tuple[str, ...]:
    """The keys of a parsed caption (`pattern` only when the grammar has patterns)."""
    return (("size",) + (("pattern",) if self.patterns else ())
            + ("colour", "shape", "relation", "n_colour", "n_shape"))

  def render(self, template: int, fact: dict[str, str]) -> str:
    """The caption of `fact` ({field: word}, relation canonical) in one template."""
    t = self.templates[template]
    words = dict(t.relation_words)
    values = {k: v for k, v in fact.items() if k != "relation"}
    text = t.text.format(a="{a}", n_a="{a}", relation=words[fact["relation"]], **values)
    out = text.split()
    for k, w in enumerate(out):
      if w == "{a}":
        out[k] = _article(out[k + 1])
    return " ".join(out)

  def slots(self, template: int) -> list[tuple[str, str | None]]:
    """(literal text, field name or None) pieces of a template, in order."""
    return [(lit, name) for lit, name, _, _ in string.Formatter().parse(self.templates[template].text)]


GRAMMAR = Grammar(
    sizes=SIZES, colours=tuple(COLOURS), shapes=SHAPES, patterns=(),
    templates=(Template("{a} {size} {colour} {shape} {relation} {n_a} {n_colour} {n_shape}",
                        tuple((r, r) for r in RELATIONS)),))


@dataclasses.dataclass(frozen=True)
class Shape:
  """One drawn object: attributes and its exact box in pixels."""
  shape: str
  colour: str
  size: str
  box: tuple[float, float, float, float]

  @property
  def centre(self) -> tuple[float, float]:
    return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclasses.dataclass(frozen=True)
class Scene:
  """A generated image with its shapes, region captions and detections."""
  image: np.ndarray            # uint8[H, W, 3]
  shapes: tuple[Shape, ...]
  region_boxes: np.ndarray     # float32[N, 4], shape boxes with jitter
  captions: tuple[str, ...]
  detections: tuple[dict, ...]  # {"label", "bbox" float32[4], "score"}


def relation(a: tuple[float, float, float, float],
             b: tuple[float, float, float, float]) -> str:
  """Where box `a` lies with respect to box `b` (one of `RELATIONS`).

  The dominant axis of the centre displacement decides; image y grows downwards.
  Ties on the axes go to the horizontal relation.
  """
  dx = (a[0] + a[2]) / 2 - (b[0] + b[2]) / 2
  dy = (a[1] + a[3]) / 2 - (b[1] + b[3]) / 2
  if abs(dx) >= abs(dy):
    return "left of" if dx < 0 else "right of"
  return "above" if dy < 0 else "below"


def nearest_neighbour(shapes: tuple[Shape, ...], i: int) -> int:
  """Index of the shape whose centre is closest to shape i's (ties: lower index)."""
  cx, cy = shapes[i].centre
  best, best_d = -1, np.inf
  for j, s in enumerate(shapes):
    if j == i:
      continue
    d = (s.centre[0] - cx) ** 2 + (s.centre[1] - cy) ** 2
    if d < best_d:
      best, best_d = j, d
  return best


def caption(shapes: tuple[Shape, ...], i: int) -> str:
  """Region caption of shape i: attributes + relation to its nearest neighbour."""
  s = shapes[i]
  n = shapes[nearest_neighbour(shapes, i)]
  return GRAMMAR.render(0, dict(size=s.size, colour=s.colour, shape=s.shape,
                                relation=relation(s.box, n.box),
                                n_colour=n.colour, n_shape=n.shape))


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _place_shapes(rng: np.random.Generator, image_size: int) -> tuple[Shape, ...]:
  """Non-overlapping shapes (with a 2 px gap), rejection-sampled."""
  count = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
  shapes: list[Shape] = []
  for _ in range(200):
    if len(shapes) == count:
      break
    size = SIZES[int(rng.integers(len(SIZES)))]
    lo, hi = _RADIUS[size]
    r = float(rng.uniform(lo, hi)) * image_size
    cx, cy = rng.uniform(r + 1, image_size - r - 1, size=2)
    box = (float(cx - r), float(cy - r), float(cx + r), float(cy + r))
    if any(box[0] < t.box[2] + 2 and t.box[0] < box[2] + 2 and
           box[1] < t.box[3] + 2 and t.box[1] < box[3] + 2 for t in shapes):
      continue
    shapes.append(Shape(shape=SHAPES[int(rng.integers(len(SHAPES)))],
                        colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
                        size=size, box=box))
  if len(shapes) < MIN_OBJECTS:
    raise RuntimeError(f"could not place {MIN_OBJECTS} shapes in a {image_size}px image")
  return tuple(shapes)


def _render(rng: np.random.Generator, shapes: tuple[Shape, ...], image_size: int) -> np.ndarray:
  """Plain or lightly textured light background with the shapes drawn on it."""
  base = rng.integers(200, 246, size=3)
  img = np.broadcast_to(base, (image_size, image_size, 3)).astype(np.float32)
  if rng.random() < 0.5:
    img = img + rng.normal(0.0, 6.0, size=(image_size, image_size, 1))
  pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(pil)
  for s in shapes:
    x1, y1, x2, y2 = s.box
    cx, cy = s.centre
    fill = COLOURS[s.colour]
    kw = dict(fill=fill, outline=(30, 30, 30), width=_OUTLINE_PX)
    if s.shape == "circle":
      draw.ellipse([x1, y1, x2, y2], **kw)
    elif s.shape == "square":
      draw.rectangle([x1, y1, x2, y2], **kw)
    elif s.shape == "triangle":
      draw.polygon([(cx, y1), (x2, y2), (x1, y2)], **kw)
    else:
      draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], **kw)
  return np.asarray(pil)


def _detect(rng: np.random.Generator, shapes, image_size: int,
            labels: tuple[str, ...] = SHAPES) -> tuple[dict, ...]:
  """Simulated detector: noisy boxes, misses, low-score false positives.

  `shapes` need `.shape` (the class) and `.box`; false positives take a class
  from `labels`.
  """
  dets = []
  for s in shapes:
    if rng.random() < _MISS_PROB:
      continue
    w, h = s.box[2] - s.box[0], s.box[3] - s.box[1]
    noise = rng.normal(0.0, 0.04, size=4) * np.array([w, h, w, h])
    box = np.clip(np.asarray(s.box) + noise, 0, image_size)
    if box[2] - box[0] < 1 or box[3] - box[1] < 1:
      continue
    dets.append({"label": s.shape, "bbox": box.astype(np.float32),
                 "score": float(rng.uniform(0.5, 1.0))})
  for _ in range(int(rng.poisson(_FALSE_POSITIVE_RATE))):
    w, h = rng.uniform(0.05, 0.3, size=2) * image_size
    x1, y1 = rng.uniform(0, image_size - w), rng.uniform(0, image_size - h)
    dets.append({"label": labels[int(rng.integers(len(labels)))],
                 "bbox": np.array([x1, y1, x1 + w, y1 + h], np.float32),
                 "score": float(rng.uniform(0.05, 0.3))})
  return tuple(dets)


def generate_scene(seed: int, split: str, index: int, image_size: int) -> Scene:
  """The scene for image `index` of `split`; a pure function of its arguments."""
  if split not in _SPLIT_CODES:
    raise ValueError(f"unknown synthetic split {split!r}; known: {sorted(_SPLIT_CODES)}")
  rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
  shapes = _place_shapes(rng, image_size)
  image = _render(rng, shapes, image_size)
  jitter = rng.uniform(-_BOX_JITTER_PX, _BOX_JITTER_PX, size=(len(shapes), 4))
  boxes = np.clip(np.array([s.box for s in shapes]) + jitter, 0, image_size).astype(np.float32)
  captions = tuple(caption(shapes, i) for i in range(len(shapes)))
  return Scene(image=image, shapes=shapes, region_boxes=boxes, captions=captions,
               detections=_detect(rng, shapes, image_size))


def image_id(split: str, index: int) -> int:
  """Globally unique image id of image `index` in `split`."""
  return _SPLIT_CODES[split] * _IMAGE_ID_STRIDE + index + 1


def scene_record(scene: Scene, split: str, index: int,
                 region_id_stride: int = _REGION_ID_STRIDE) -> dict:
  """The TFDS record (issue #5 layout) of one scene."""
  iid = image_id(split, index)
  h, w = scene.image.shape[:2]
  return {
      "image": scene.image,
      "image_id": iid,
      "width": w,
      "height": h,
      "regions": {
          "id": np.array([iid * region_id_stride + k for k in range(len(scene.captions))], np.int64),
          "bbox": scene.region_boxes.reshape(-1, 4),
          "caption": list(scene.captions),
      },
      "objects": {
          "label": [d["label"] for d in scene.detections],
          "bbox": np.array([d["bbox"] for d in scene.detections], np.float32).reshape(-1, 4),
          "score": np.array([d["score"] for d in scene.detections], np.float32),
      },
  }


class SyntheticRegions(tfds.core.GeneratorBasedBuilder):
  """Procedural coloured-shape scenes with region captions and detections.

  Sizes are constructor arguments (from `config.data.synthetic`); they are
  needed only to build, and are stored in the dataset's metadata so that a
  prepared dataset can be checked against the config that asks for it.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  DESCRIPTION = __doc__

  def __init__(self, *, num_train_images: int | None = None,
               num_validation_images: int | None = None,
               num_test_images: int | None = None,
               image_size: int | None = None, seed: int | None = None, **kwargs):
    self._gen = dict(num_train_images=num_train_images,
                     num_validation_images=num_validation_images,
                     num_test_images=num_test_images, image_size=image_size, seed=seed)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    box = tfds.features.Tensor(shape=(4,), dtype=np.float32)
    return self.dataset_info_from_configs(
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "image_id": np.int64,
            "width": np.int64,
            "height": np.int64,
            "regions": tfds.features.Sequence({
                "id": np.int64, "bbox": box, "caption": tfds.features.Text()}),
            "objects": tfds.features.Sequence({
                "label": tfds.features.Text(), "bbox": box, "score": np.float32}),
        }),
        metadata=tfds.core.MetadataDict(generator=dict(self._gen)),
        homepage="https://arxiv.org/abs/2412.10348",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    missing = [k for k, v in self._gen.items() if v is None]
    if missing:
      raise ValueError(f"{self.name}: building needs {missing} "
                       "(pass config.data.synthetic to the builder)")
    counts = {"train": self._gen["num_train_images"],
              "validation": self._gen["num_validation_images"],
              "test": self._gen["num_test_images"]}
    return {split: self._generate_examples(split, n) for split, n in counts.items()}

  def _generate_examples(self, split: str, count: int):
    for i in range(count):
      yield i, self._record(split, i)

  def _record(self, split: str, index: int) -> dict:
    scene = generate_scene(self._gen["seed"], split, index, self._gen["image_size"])
    return scene_record(scene, split, index)


def generator_settings(synthetic_config) -> dict:
  """The builder kwargs for a `config.data.synthetic` ConfigDict."""
  return dict(num_train_images=int(synthetic_config.num_train_images),
              num_validation_images=int(synthetic_config.num_validation_images),
              num_test_images=int(synthetic_config.num_test_images),
              image_size=int(synthetic_config.image_size), seed=int(synthetic_config.seed))
