"""The GOD job as an Apache Beam pipeline (TFDS's Beam path), for builds past one machine.

`GodBuilder` returns `annotate_transform(...)` instead of a Python generator
when it is built with `use_beam=True`; TFDS then runs the split through Beam
(DirectRunner on one machine, Dataflow/Flink/Spark past it) and writes the same
array_record shards as the in-process path, record `i` = base record `i`
(`disable_shuffling` keys the output by base index).

Each worker opens the base dataset's array_record files itself (random access,
no TensorFlow) once, in `DoFn.setup`, so `data_dir` must be readable by every
worker (a `gs://` path on Dataflow). Only this module imports apache_beam; it
is an optional extra with its own virtualenv (`pip install .[beam]`).
"""
from __future__ import annotations

import apache_beam as beam
import tensorflow_datasets as tfds

from aligncap_jax.data import tags
from aligncap_jax.data.builders.god import god_builder


class AnnotateFn(beam.DoFn):
  """Base record index -> (index, GOD record), one base split per instance."""

  def __init__(self, base_name: str, data_dir: str, split: str,
               params: god_builder.GodParams, vocab: list[str],
               detections: dict[int, list[dict]] | None):
    self._base_name, self._data_dir, self._split = base_name, data_dir, split
    self._params, self._vocab, self._detections = params, vocab, detections
    self._source = self._matcher = None
    self._no_detections = beam.metrics.Metrics.counter("god", "images_without_detections")
    self._images = beam.metrics.Metrics.counter("god", "images")

  def setup(self):
    base = god_builder.open_base(self._base_name, self._data_dir)
    self._source = base.as_data_source(self._split,
                                       decoders={"image": tfds.decode.SkipDecoding()})
    self._matcher = tags.TagMatcher(self._vocab)

  def process(self, index: int):
    record = self._source[int(index)]
    if self._detections is None:
      objects = god_builder.objects_list(record["objects"])
    else:
      objects = self._detections.get(int(record["image_id"]), [])
    self._images.inc()
    if not objects:
      self._no_detections.inc()
    yield int(index), god_builder.annotate_record(record, objects, self._params, self._matcher)


def annotate_transform(base_name: str, data_dir: str, split: str, num_examples: int,
                       params: god_builder.GodParams, vocab: list[str],
                       detections: dict[int, list[dict]] | None) -> beam.PTransform:
  """The PTransform TFDS applies to its pipeline for one split.

  `Reshuffle` after `Create` spreads the indices over workers (without it a
  runner may fuse the whole split into one bundle on one worker).
  """
  return (f"Indices_{split}" >> beam.Create(range(num_examples))
          | f"Spread_{split}" >> beam.Reshuffle()
          | f"Annotate_{split}" >> beam.ParDo(
              AnnotateFn(base_name, data_dir, split, params, vocab, detections)))


def pipeline_options(options: str) -> beam.options.pipeline_options.PipelineOptions:
  """`config.data.god_beam_options` ("--runner=... --flag=value ...") as Beam options."""
  return beam.options.pipeline_options.PipelineOptions(options.split())
