"""The hard synthetic variant: `synthetic_regions_hard` (`configs/synthetic.py:hard`).

A benchmark on which the context views decide the context half of a caption:

- 3-8 objects per scene, some overlapping (at most `_MAX_OVERLAP` of the
  smaller box, neither centre covered), drawn in order, later ones on top;
- confusable attributes: 12 colours in close pairs (red/crimson, orange/amber,
  yellow/lime, green/teal, blue/navy, purple/pink) with +-`_COLOUR_JITTER` per
  channel, 8 shapes (pentagon/hexagon, diamond/square, star/cross...), 3 sizes
  with close radius ranges, 4 fill patterns (plain, striped, dotted, checked;
  the pattern is a light tint of the fill, its period fixed in pixels);
- every caption names the target's relation to its *neighbour*: the nearest
  object (by centre) whose region box lies at least `NEIGHBOUR_GAP_PX` outside
  the target's region box, so no pixel of it is in the target's own view and
  only a context view can show it. Relation and neighbour are computed from
  the stored region boxes, so they can be recomputed exactly from a record
  (`neighbour_index`, `synthetic.relation`);
- four paraphrase templates per fact (`GRAMMAR`; the attribute parser reads
  the same object): "a small striped red circle left of a blue square",
  "small striped red circle to the left of a blue square", "a blue square is
  right of this small striped red circle", "a small striped red circle with a
  blue square to the right of it". A train region gets one template drawn at
  random; validation and test hold one region per template with the same box,
  so each evaluation target has the four paraphrases as references (exact match
  and CIDEr are then not capped by the draw of a template);
- the simulated detector of the default variant (`synthetic._detect`: misses,
  low-score false positives over the 8 classes, box noise).

Everything is a pure function of `(seed, split, image index)`, as in the
default variant, and records share its layout (`synthetic.scene_record`).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from aligncap_jax.data import synthetic

NAME = "synthetic_regions_hard"
COLOURS = {
    "red": (210, 40, 40),
    "crimson": (160, 20, 80),
    "orange": (240, 130, 30),
    "amber": (225, 180, 20),
    "yellow": (240, 225, 60),
    "lime": (150, 210, 40),
    "green": (40, 150, 60),
    "teal": (20, 140, 140),
    "blue": (40, 90, 220),
    "navy": (30, 40, 140),
    "purple": (130, 50, 170),
    "pink": (230, 110, 170),
}
SHAPES = ("circle", "square", "triangle", "diamond", "pentagon", "hexagon", "star", "cross")
SIZES = ("small", "medium", "large")
PATTERNS = ("plain", "striped", "dotted", "checked")
# Shape radius (half the box side) as a fraction of the image side, per size.
_RADIUS = {"small": (0.055, 0.07), "medium": (0.08, 0.095), "large": (0.11, 0.13)}
MIN_OBJECTS = 3
MAX_OBJECTS = 8
NEIGHBOUR_GAP_PX = 2.0   # a neighbour's region box lies at least this far outside the target's
_MAX_OVERLAP = 0.25      # of the smaller box's area
_COLOUR_JITTER = 12      # +- per channel, per object
_PATTERN_PX = 3          # half period of stripes / checks, dot grid step / 2
_TINT = 0.55             # pattern colour = fill mixed with white by this much
_ALL_TEMPLATE_SPLITS = ("validation", "test")
_REGION_ID_STRIDE = 64   # up to MAX_OBJECTS x 4 templates regions per image

_ALT = {"left of": "to the left of", "right of": "to the right of", "above": "over",
        "below": "under"}
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
GRAMMAR = synthetic.Grammar(
    sizes=SIZES, colours=tuple(COLOURS), shapes=SHAPES, patterns=PATTERNS,
    templates=(
        synthetic.Template(
            "{a} {size} {pattern} {colour} {shape} {relation} {n_a} {n_colour} {n_shape}",
            tuple((r, r) for r in synthetic.RELATIONS)),
        synthetic.Template(
            "{size} {pattern} {colour} {shape} {relation} {n_a} {n_colour} {n_shape}",
            tuple((r, _ALT[r]) for r in synthetic.RELATIONS)),
        synthetic.Template(
            "{n_a} {n_colour} {n_shape} is {relation} this {size} {pattern} {colour} {shape}",
            tuple((r, _INVERSE[r]) for r in synthetic.RELATIONS)),
        synthetic.Template(
            "{a} {size} {pattern} {colour} {shape} with {n_a} {n_colour} {n_shape} {relation} it",
            tuple((r, _ALT[_INVERSE[r]]) for r in synthetic.RELATIONS)),
    ))


@dataclasses.dataclass(frozen=True)
class HardShape:
  """One drawn object: attributes, its exact box in pixels and its fill colour."""
  shape: str
  colour: str
  size: str
  pattern: str
  box: tuple[float, float, float, float]
  rgb: tuple[int, int, int]

  @property
  def centre(self) -> tuple[float, float]:
    return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclasses.dataclass(frozen=True)
class HardScene:
  """A generated image; one entry per region in `region_*` and `captions`."""
  image: np.ndarray              # uint8[H, W, 3]
  shapes: tuple[HardShape, ...]
  object_boxes: np.ndarray       # float32[N, 4], the objects' region boxes (with jitter)
  neighbours: tuple[int, ...]    # per object, its neighbour's index
  region_boxes: np.ndarray       # float32[R, 4], object_boxes[region_objects]
  region_objects: tuple[int, ...]
  captions: tuple[str, ...]
  detections: tuple[dict, ...]


def neighbour_index(boxes: np.ndarray, i: int) -> int:
  """The neighbour of box i: nearest centre among boxes >= NEIGHBOUR_GAP_PX outside it.

  Args:
    boxes: float[N, 4] region boxes x1, y1, x2, y2.
    i: the target.

  Returns:
    The index (ties: lower index), or -1 when every other box is too close.
  """
  boxes = np.asarray(boxes, np.float64)
  a, g = boxes[i], NEIGHBOUR_GAP_PX
  outside = ((boxes[:, 0] >= a[2] + g) | (boxes[:, 2] <= a[0] - g)
             | (boxes[:, 1] >= a[3] + g) | (boxes[:, 3] <= a[1] - g))
  outside[i] = False
  if not outside.any():
    return -1
  centres = (boxes[:, :2] + boxes[:, 2:]) / 2
  d = ((centres - centres[i]) ** 2).sum(-1)
  d[~outside] = np.inf
  return int(np.argmin(d))


def fact(shapes: tuple[HardShape, ...], boxes: np.ndarray, i: int, n: int) -> dict[str, str]:
  """The grammar fields of object i with neighbour n (relation from the region boxes)."""
  s, t = shapes[i], shapes[n]
  return dict(size=s.size, pattern=s.pattern, colour=s.colour, shape=s.shape,
              relation=synthetic.relation(tuple(boxes[i]), tuple(boxes[n])),
              n_colour=t.colour, n_shape=t.shape)


def _may_overlap(a, b) -> bool:
  """Whether box a may join a scene holding box b (limited overlap, centres uncovered)."""
  iw = min(a[2], b[2]) - max(a[0], b[0])
  ih = min(a[3], b[3]) - max(a[1], b[1])
  if iw <= -2 or ih <= -2:
    return True
  if iw <= 0 or ih <= 0:
    return False     # touching but not overlapping: keep a 2 px gap, as the default variant

  def covers(box, other):
    cx, cy = (other[0] + other[2]) / 2, (other[1] + other[3]) / 2
    return box[0] <= cx <= box[2] and box[1] <= cy <= box[3]

  area = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
  return iw * ih <= _MAX_OVERLAP * area and not covers(a, b) and not covers(b, a)


def _place_shapes(rng: np.random.Generator, image_size: int) -> tuple[HardShape, ...]:
  count = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
  names = list(COLOURS)
  shapes: list[HardShape] = []
  for _ in range(400):
    if len(shapes) == count:
      break
    size = SIZES[int(rng.integers(len(SIZES)))]
    lo, hi = _RADIUS[size]
    r = float(rng.uniform(lo, hi)) * image_size
    cx, cy = rng.uniform(r + 1, image_size - r - 1, size=2)
    box = (float(cx - r), float(cy - r), float(cx + r), float(cy + r))
    if not all(_may_overlap(box, t.box) for t in shapes):
      continue
    colour = names[int(rng.integers(len(names)))]
    rgb = np.clip(np.array(COLOURS[colour]) + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3),
                  0, 255)
    shapes.append(HardShape(shape=SHAPES[int(rng.integers(len(SHAPES)))], colour=colour,
                            size=size, pattern=PATTERNS[int(rng.integers(len(PATTERNS)))],
                            box=box, rgb=tuple(int(v) for v in rgb)))
  return tuple(shapes)


def _outline(s: HardShape) -> list[tuple[float, float]] | None:
  """Polygon of a shape (None: the circle, drawn as an ellipse)."""
  x1, y1, x2, y2 = s.box
  cx, cy = s.centre
  r = (x2 - x1) / 2

  def ring(n, start_deg, radii):
    a = np.deg2rad(start_deg + 360.0 / n * np.arange(n))
    rr = np.resize(np.asarray(radii, np.float64), n)
    return [(float(cx + q * np.cos(t)), float(cy + q * np.sin(t))) for q, t in zip(rr, a)]

  if s.shape == "circle":
    return None
  if s.shape == "square":
    return [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
  if s.shape == "triangle":
    return [(cx, y1), (x2, y2), (x1, y2)]
  if s.shape == "diamond":
    return [(cx, y1), (x2, cy), (cx, y2), (x1, cy)]
  if s.shape == "pentagon":
    return ring(5, -90, [r])
  if s.shape == "hexagon":
    return ring(6, 0, [r])
  if s.shape == "star":
    return ring(10, -90, [r, 0.45 * r])
  w = 0.33 * r   # cross
  return [(cx - w, y1), (cx + w, y1), (cx + w, cy - w), (x2, cy - w), (x2, cy + w),
          (cx + w, cy + w), (cx + w, y2), (cx - w, y2), (cx - w, cy + w), (x1, cy + w),
          (x1, cy - w), (cx - w, cy - w)]


def _pattern(name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """bool mask of the pattern's tinted pixels; x, y relative to the shape's box."""
  p = _PATTERN_PX
  if name == "plain":
    return np.zeros(x.shape, bool)
  if name == "striped":
    return (np.floor((x + y) / p) % 2) == 0
  if name == "dotted":
    return ((x % (2 * p) - p) ** 2 + (y % (2 * p) - p) ** 2) <= (0.6 * p) ** 2
  return ((np.floor(x / p) + np.floor(y / p)) % 2) == 0   # checked


def _mask(s: HardShape, image_size: int, outline_only: bool) -> np.ndarray:
  pil = Image.new("L", (image_size, image_size), 0)
  draw = ImageDraw.Draw(pil)
  kw = (dict(outline=255, width=synthetic._OUTLINE_PX) if outline_only  # pylint: disable=protected-access
        else dict(fill=255))
  poly = _outline(s)
  if poly is None:
    draw.ellipse(list(s.box), **kw)
  else:
    draw.polygon(poly, **kw)
  return np.asarray(pil) > 0


def _render(rng: np.random.Generator, shapes: tuple[HardShape, ...], image_size: int) -> np.ndarray:
  """Plain or lightly textured background; shapes filled, patterned, outlined, in order."""
  base = rng.integers(200, 246, size=3)
  img = np.broadcast_to(base, (image_size, image_size, 3)).astype(np.float32)
  if rng.random() < 0.5:
    img = img + rng.normal(0.0, 6.0, size=(image_size, image_size, 1))
  yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
  for s in shapes:
    fill = _mask(s, image_size, outline_only=False)
    tinted = fill & _pattern(s.pattern, xx - np.floor(s.box[0]), yy - np.floor(s.box[1]))
    colour = np.asarray(s.rgb, np.float32)
    img[fill] = colour
    img[tinted] = np.round(colour + (255.0 - colour) * _TINT)
    img[_mask(s, image_size, outline_only=True)] = (30, 30, 30)
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


def generate_scene(seed: int, split: str, index: int, image_size: int) -> HardScene:
  """The scene for image `index` of `split`; a pure function of its arguments."""
  if split not in synthetic._SPLIT_CODES:  # pylint: disable=protected-access
    raise ValueError(f"unknown synthetic split {split!r}; known: "
                     f"{sorted(synthetic._SPLIT_CODES)}")  # pylint: disable=protected-access
  rng = np.random.default_rng([seed, synthetic._SPLIT_CODES[split], index, 1])  # pylint: disable=protected-access
  for _ in range(50):
    shapes = _place_shapes(rng, image_size)
    if len(shapes) < MIN_OBJECTS:
      continue
    jitter = rng.uniform(-synthetic._BOX_JITTER_PX, synthetic._BOX_JITTER_PX,  # pylint: disable=protected-access
                         size=(len(shapes), 4))
    boxes = np.clip(np.array([s.box for s in shapes]) + jitter, 0, image_size).astype(np.float32)
    neighbours = tuple(neighbour_index(boxes, i) for i in range(len(shapes)))
    if min(neighbours) >= 0:
      break
  else:
    raise RuntimeError(f"could not place {MIN_OBJECTS} shapes with neighbours in a "
                       f"{image_size}px image")
  image = _render(rng, shapes, image_size)
  drawn = rng.integers(len(GRAMMAR.templates), size=len(shapes))
  objects, captions = [], []
  for i, n in enumerate(neighbours):
    f = fact(shapes, boxes, i, n)
    templates = (range(len(GRAMMAR.templates)) if split in _ALL_TEMPLATE_SPLITS
                 else [int(drawn[i])])
    for t in templates:
      objects.append(i)
      captions.append(GRAMMAR.render(t, f))
  return HardScene(image=image, shapes=shapes, object_boxes=boxes, neighbours=neighbours,
                   region_boxes=boxes[objects], region_objects=tuple(objects),
                   captions=tuple(captions),
                   detections=synthetic._detect(rng, shapes, image_size, labels=SHAPES))  # pylint: disable=protected-access


class SyntheticRegionsHard(synthetic.SyntheticRegions):
  """The hard synthetic variant (module docstring); same settings and layout."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  DESCRIPTION = __doc__

  def _record(self, split: str, index: int) -> dict:
    scene = generate_scene(self._gen["seed"], split, index, self._gen["image_size"])
    return synthetic.scene_record(scene, split, index, region_id_stride=_REGION_ID_STRIDE)
