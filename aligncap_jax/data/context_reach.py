"""How often the views a region gets can show its caption's context at all.

A synthetic caption names the target's neighbour (default variant: the nearest
object; hard variant: the nearest object outside the target's box,
`synthetic_hard.neighbour_index`). The model can only read that neighbour from a
context view that contains it, so the fraction of evaluation targets whose
neighbour box lies inside one of their selected views bounds the context half of
the per-attribute accuracy. Reported beside it by `--mode eval`.
"""
from __future__ import annotations

import numpy as np

from aligncap_jax.data import god
from aligncap_jax.data import pipeline
from aligncap_jax.data import synthetic_hard
from aligncap_jax.data import transforms
from aligncap_jax.metrics import densecap

# Region boxes carry +-1 px of jitter around the drawn shape (data/synthetic.py).
_SLACK_PX = 2.0


def _nearest(boxes: np.ndarray, i: int) -> int:
  centres = (boxes[:, :2] + boxes[:, 2:]) / 2
  d = ((centres - centres[i]) ** 2).sum(-1)
  d[i] = np.inf
  return int(np.argmin(d))


def _neighbour_box(name: str, boxes: np.ndarray, i: int) -> np.ndarray:
  """The box of region i's neighbour, by the rule of dataset `name`'s generator."""
  if name != synthetic_hard.NAME:
    return boxes[_nearest(boxes, i)]
  # One region per paraphrase shares an object's box: neighbours are objects.
  objects, where = np.unique(boxes, axis=0, return_inverse=True)
  first = sorted(range(len(objects)), key=lambda k: int(np.flatnonzero(where.ravel() == k)[0]))
  ordered = objects[first]
  target = first.index(int(where.ravel()[i]))
  return ordered[synthetic_hard.neighbour_index(ordered, target)]


def _inside(inner: np.ndarray, outer: np.ndarray) -> bool:
  return bool(inner[0] >= outer[0] - _SLACK_PX and inner[1] >= outer[1] - _SLACK_PX and
              inner[2] <= outer[2] + _SLACK_PX and inner[3] <= outer[3] + _SLACK_PX)


def context_reach(config, split: str, max_examples: int = 0) -> dict[str, float]:
  """{"context_in_eval_views", "context_in_any_view"}: fractions of the targets.

  `context_in_eval_views`: the neighbour lies inside one of the j-1 views eval
  selects (greatest pHash distance, after `data.context_drop_iou`'s filter);
  `context_in_any_view`: inside some stored candidate view (the simulated
  detector's misses bound this one). With `data.context_crop="object"` a view
  shows the neighbour when its object is a detection of it (IoU >= 0.5).
  """
  source = pipeline._source(config, split)  # pylint: disable=protected-access
  rows = pipeline._eval_target_rows(config, split, max_examples)  # pylint: disable=protected-access
  # The views eval gives each target: data.context_drop_iou's filter, then selection.
  feat = pipeline._Featurizer.from_config(config, None, split)  # pylint: disable=protected-access
  objects_crop = config.data.context_crop == "object"
  in_eval = in_any = 0
  for t in rows:
    record = source[t["_record"]]
    regions = pipeline._regions(record)  # pylint: disable=protected-access
    w, h = int(record["width"]), int(record["height"])
    boxes = np.stack([np.asarray(r["bbox"], np.float32) for r in regions])
    if len(boxes) < 2:
      continue
    neighbour = _neighbour_box(config.data.name, boxes, t["_region"])
    region = regions[t["_region"]]
    box = transforms.clip_box(region["bbox"], w, h)
    objects = record.get("objects")
    pool, distances = feat.context_pool(box, region["views"], region["view_distance"],
                                        objects, (w, h))
    chosen = god.select_views(pool, distances, feat.num_views - 1, train=False, target_box=box)
    if objects_crop and objects is not None:
      # Object crops show the objects themselves: the neighbour is shown by a view
      # whose object is a detection of it (IoU >= 0.5), not by a union containing it.
      shows = lambda views: bool(np.any(densecap.pairwise_iou(
          god.objects_of_views(views, box, objects, image_size=(w, h)), neighbour[None],
          "continuous") >= 0.5))
    else:
      shows = lambda views: any(_inside(neighbour, v) for v in views)
    in_eval += shows(chosen)
    in_any += shows(pool)
  n = max(len(rows), 1)
  return {"context_in_eval_views": in_eval / n, "context_in_any_view": in_any / n}
