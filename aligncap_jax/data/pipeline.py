"""The grain input pipeline: GOD records -> per-region numpy batches.

What the trainer, evaluator and predictor call:

- `prepare(config)` makes sure the datasets exist (builds the synthetic ones,
  `SYNTHETIC_BUILDERS`);
- `load_assets(config)` loads the tokenizers, tag vocabulary and the tag tables;
- `make_train_iterator` / `make_eval_iterator` / `make_predict_batch` give batch
  dicts with the DESIGN.md section 10 layout:

  `views` uint8[B, j, S, S, 3], `view_boxes` float32[B, j, 4],
  `caption_tokens`/`caption_mask` int32[B, T], `clip_tokens`/`clip_mask`
  int32[B, 77], `tag_labels` float32[B, V], `prompt_tokens`/`prompt_mask`
  int32[B, P], `region_id`, `image_id`, `valid` int32[B].

Training reads a `MapDataset` over this process's contiguous shard of the
region index (`regions_<split>.npy` of the GOD dataset), shuffled with a seed
that is folded with the epoch, repeated forever. All per-region randomness (GOD
view sampling, prompt dropout) comes from `np.random.default_rng([seed, epoch,
region row])`, so the iterator state (a position) restores batches exactly.

Bad data: regions whose caption is empty or whitespace, or whose box has no area
inside the image, are skipped and counted (`stats()`, logged); captions longer
than `max_caption_tokens` are truncated and counted. A record whose image cannot
be decoded is an error naming the record (builders already skip corrupt images,
so one here means the prepared dataset is damaged).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import os
import shutil
import threading

import grain
import numpy as np
import tensorflow_datasets as tfds
import tokenizers
from absl import logging

from aligncap_jax.data import god, god_tfds, synthetic, synthetic_hard, tags, tokenizer, transforms

SYNTHETIC_NAME = "synthetic_regions"
# The embedded datasets `prepare` builds itself, by `config.data.name`.
SYNTHETIC_BUILDERS = {SYNTHETIC_NAME: synthetic.SyntheticRegions,
                      synthetic_hard.NAME: synthetic_hard.SyntheticRegionsHard}
_STATS: collections.Counter = collections.Counter()
_STATS_LOCK = threading.Lock()


def _count(kind: str, what: str) -> None:
  with _STATS_LOCK:
    _STATS[kind] += 1
    n = _STATS[kind]
  if n <= 5 or n % 1000 == 0:
    logging.warning("data: %s (%s; %d so far)", kind, what, n)


def stats() -> dict[str, int]:
  """Counts of skipped/truncated items seen by this process so far."""
  with _STATS_LOCK:
    return dict(_STATS)


# ------------------------------------------------------------------ locations


def data_dir(config) -> str:
  """The TFDS data_dir: `config.data.data_dir`, else `$TFDS_DATA_DIR`, else TFDS's default."""
  return os.path.expanduser(config.data.data_dir or os.environ.get("TFDS_DATA_DIR")
                            or tfds.core.constants.DATA_DIR)


def _synthetic_builder(config, **kwargs) -> synthetic.SyntheticRegions:
  cls = SYNTHETIC_BUILDERS[config.data.name]
  return cls(data_dir=data_dir(config), file_format="array_record", **kwargs)


def dataset_tokenizer_path(config) -> str:
  """Where the synthetic dataset stores its tokenizer (inside its version folder)."""
  return os.path.join(_synthetic_builder(config).data_dir, tokenizer.TOKENIZER_FILE)


# ------------------------------------------------------------------ prepare


def prepare(config, *, build_missing_synthetic: bool = True, build_real: bool = False) -> None:
  """Makes sure the base dataset, its tokenizer (synthetic) and the GOD dataset exist.

  Args:
    config: the full config.
    build_missing_synthetic: build the synthetic dataset, tokenizer and GOD
      dataset when missing (or built with other generator settings).
    build_real: build a real dataset (`--mode prepare`): run its TFDS builder
      from `config.data.manual_dir`, then the GOD job.

  Raises:
    FileNotFoundError: a dataset is missing and may not be built here; the
      message says what to run.
  """
  name, ddir = config.data.name, data_dir(config)
  synthetic_data = name in SYNTHETIC_BUILDERS
  if synthetic_data:
    _prepare_synthetic(config, build=build_missing_synthetic)
  elif build_real:
    from aligncap_jax.data import builders  # real datasets only

    builders.prepare(name, data_dir=ddir, manual_dir=config.data.manual_dir,
                     strict=config.data.strict, split_file=config.data.split_file)
  ready = _god_ready(config)
  if ready and _god_settings_match(config):
    return
  if (not synthetic_data and not build_real) or (synthetic_data and not build_missing_synthetic):
    if ready:
      raise ValueError(
          f"GOD dataset {name}_god in {ddir} was built with other settings than the config "
          f"asks for (data.god_top_k={config.data.god_top_k}, data.god_score_threshold="
          f"{config.data.god_score_threshold}, data.tag_vocab_size={config.data.tag_vocab_size}, "
          f"data.tag_list_file, data.detections_file; see {name}_god's "
          f"{god_tfds.god_builder.PARAMS_FILE}); rebuild it with `--mode prepare` or use its settings")
    if synthetic_data:
      raise FileNotFoundError(f"GOD dataset {name}_god not found in {ddir}")
    raise FileNotFoundError(
        f"GOD dataset {name}_god not found in {ddir}; build it once with "
        f"`python -m aligncap_jax.main --config CONFIG --workdir DIR --mode prepare`")
  print(f"[prepare] running GOD on {name} -> {name}_god in {ddir}", flush=True)
  god_tfds.build(name, data_dir=ddir, top_k=config.data.god_top_k,
                 score_threshold=config.data.god_score_threshold,
                 tag_vocab_size=config.data.tag_vocab_size,
                 tag_list_file=config.data.tag_list_file,
                 detections_file=config.data.detections_file,
                 num_processes=config.data.god_num_processes,
                 beam_options=config.data.god_beam_options,
                 hash_method=config.data.god_hash)


def _prepare_synthetic(config, *, build: bool) -> None:
  ddir, name = data_dir(config), config.data.name
  want = synthetic.generator_settings(config.data.synthetic)
  builder = _synthetic_builder(config)
  if builder.is_prepared():
    have = dict(builder.info.metadata.get("generator", {}))
    if have == want:
      if not os.path.isfile(dataset_tokenizer_path(config)):
        _train_tokenizer(config, builder)
      return
    if not build:
      raise FileNotFoundError(f"{name} in {ddir} was built with {have}, "
                              f"the config asks for {want}")
    print(f"[prepare] {name} in {ddir} was built with {have}; rebuilding with {want}",
          flush=True)
    for folder in (name, f"{name}_god"):
      shutil.rmtree(os.path.join(ddir, folder), ignore_errors=True)
  elif not build:
    raise FileNotFoundError(f"{name} not found in {ddir}")
  print(f"[prepare] building {name} {want} in {ddir}", flush=True)
  builder = _synthetic_builder(config, **want)
  builder.download_and_prepare()
  _train_tokenizer(config, builder)


def _train_tokenizer(config, builder) -> None:
  source = builder.as_data_source(config.data.train_split,
                                  decoders={"image": tfds.decode.SkipDecoding()})
  captions = [_text(c) for i in range(len(source)) for c in source[i]["regions"]["caption"]]
  tok = tokenizer.train_word_level(captions)
  path = os.path.join(builder.data_dir, tokenizer.TOKENIZER_FILE)
  tok.save(path)
  print(f"[prepare] tokenizer: {tok.get_vocab_size()} tokens from {len(captions)} "
        f"captions -> {path}", flush=True)


def _god_ready(config) -> bool:
  return god_tfds.is_built(config.data.name, data_dir(config))


def _god_settings_match(config) -> bool:
  d = config.data
  return god_tfds.settings_match(d.name, data_dir=data_dir(config), top_k=d.god_top_k,
                                 score_threshold=d.god_score_threshold,
                                 tag_vocab_size=d.tag_vocab_size, tag_list_file=d.tag_list_file,
                                 detections_file=d.detections_file)


# ------------------------------------------------------------------ assets


@dataclasses.dataclass(frozen=True)
class Assets:
  """Tokenizers, tag vocabulary and the tag tables the model and pipeline share.

  Attributes:
    llm_tokenizer: tokenizer of the LLM (captions, prompts).
    clip_tokenizer: tokenizer of the frozen CLIP text tower.
    tag_vocab: the V tags, in vocabulary order.
    tag_clip_tokens: int32[V, 77] each tag's CLIP-text ids.
    tag_clip_mask: int32[V, 77].
    tag_token_table: int32[V, Lt] each tag's LLM ids, no EOS, right-padded.
    tag_token_lens: int32[V] number of valid ids per row.
    comma_id: LLM id of ",".
    bar_id: LLM id of "|".
    eos_id: LLM EOS id (`config.model.llm.eos_token_id`).
    pad_id: LLM pad id (`config.model.llm.pad_token_id`).
  """
  llm_tokenizer: tokenizers.Tokenizer
  clip_tokenizer: tokenizers.Tokenizer
  tag_vocab: list[str]
  tag_clip_tokens: np.ndarray
  tag_clip_mask: np.ndarray
  tag_token_table: np.ndarray
  tag_token_lens: np.ndarray
  comma_id: int
  bar_id: int
  eos_id: int
  pad_id: int


def _tokenizer_for(config, field: str) -> tokenizers.Tokenizer:
  path = config.data[field]
  if path:
    return tokenizer.load(path)
  own = dataset_tokenizer_path(config) if config.data.name in SYNTHETIC_BUILDERS else None
  if own is None or not os.path.isfile(own):
    raise FileNotFoundError(
        f"config.data.{field} is not set and dataset {config.data.name} stores no tokenizer"
        + (f" (looked for {own}; run --mode prepare)" if own else ""))
  return tokenizer.load(own)


def make_assets(llm_tokenizer: tokenizers.Tokenizer, clip_tokenizer: tokenizers.Tokenizer,
                tag_vocab: list[str], *, eos_id: int, pad_id: int, clip_max_tokens: int,
                max_prompt_tokens: int) -> Assets:
  """Builds the tag tables from tokenizers and a vocabulary."""
  rows = [tokenizer.encode_words(llm_tokenizer, t)[:max_prompt_tokens] for t in tag_vocab]
  width = max([1] + [len(r) for r in rows])
  table = np.full((len(rows), width), pad_id, np.int32)
  for i, r in enumerate(rows):
    table[i, :len(r)] = r
  clip = [tokenizer.encode_clip(clip_tokenizer, t, clip_max_tokens) for t in tag_vocab]
  clip_ids = np.stack([c[0] for c in clip]) if clip else np.zeros((0, clip_max_tokens), np.int32)
  clip_mask = np.stack([c[1] for c in clip]) if clip else np.zeros((0, clip_max_tokens), np.int32)
  return Assets(llm_tokenizer=llm_tokenizer, clip_tokenizer=clip_tokenizer,
                tag_vocab=list(tag_vocab), tag_clip_tokens=clip_ids, tag_clip_mask=clip_mask,
                tag_token_table=table, tag_token_lens=np.array([len(r) for r in rows], np.int32),
                comma_id=tokenizer.token_id(llm_tokenizer, ","),
                bar_id=tokenizer.token_id(llm_tokenizer, "|"), eos_id=int(eos_id),
                pad_id=int(pad_id))


def load_assets(config) -> Assets:
  """Tokenizers (config paths, else the dataset's own), tag vocabulary and tables."""
  vocab_path = god_tfds.tag_vocab_path(config.data.name, data_dir(config))
  if not os.path.isfile(vocab_path):
    raise FileNotFoundError(f"tag vocabulary not found: {vocab_path} (run --mode prepare)")
  return make_assets(_tokenizer_for(config, "llm_tokenizer"),
                     _tokenizer_for(config, "clip_tokenizer"), tags.load_vocab(vocab_path),
                     eos_id=config.model.llm.eos_token_id, pad_id=config.model.llm.pad_token_id,
                     clip_max_tokens=config.data.clip_max_tokens,
                     max_prompt_tokens=config.data.max_prompt_tokens)


def build_prompt(tag_ids, assets: Assets, max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Tag prompt: table rows joined by ",", then "|", then EOS; truncated keeping EOS.

  Args:
    tag_ids: int[k] vocabulary indices, in prompt order (k may be 0).
    assets: the tag table and special ids.
    max_len: P.

  Returns:
    (tokens int32[P], mask int32[P]); unused positions are zero.
  """
  seq: list[int] = []
  for n, t in enumerate(np.asarray(tag_ids, np.int64).reshape(-1)):
    if n:
      seq.append(assets.comma_id)
    seq.extend(assets.tag_token_table[t, :assets.tag_token_lens[t]].tolist())
  seq = (seq + [assets.bar_id])[:max_len - 1] + [assets.eos_id]
  tokens = np.zeros((max_len,), np.int32)
  mask = np.zeros((max_len,), np.int32)
  tokens[:len(seq)] = seq
  mask[:len(seq)] = 1
  return tokens, mask


def train_prompt(tag_ids, assets: Assets, max_len: int, rng: np.random.Generator, *,
                 prompt_drop_prob: float, tag_drop_prob: float) -> tuple[np.ndarray, np.ndarray]:
  """Training prompt from ground-truth tags with DESIGN.md section 3's dropout.

  With probability `prompt_drop_prob` the whole prompt is dropped; otherwise each
  tag is kept with probability `1 - tag_drop_prob` and the kept tags are shuffled.
  A dropped prompt is the prompt of no tags ("|" and EOS), exactly what inference
  builds when no predicted tag passes the threshold: an all-padding prompt never
  occurs at inference, and a model trained on it (e.g. with `prompt_drop_prob=1`)
  met an input at test time that it had never seen.
  """
  if rng.random() < prompt_drop_prob:
    return build_prompt([], assets, max_len)
  ids = np.asarray(tag_ids, np.int64).reshape(-1)
  kept = ids[rng.random(len(ids)) >= tag_drop_prob]
  return build_prompt(rng.permutation(kept), assets, max_len)


# ------------------------------------------------------------------ per-region features


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _regions(record) -> list[dict]:
  """The record's regions as a list of dicts (TFDS Sequence may give a dict of lists)."""
  regs = record["regions"]
  if isinstance(regs, dict):
    n = len(regs["id"])
    return [{k: v[i] for k, v in regs.items()} for i in range(n)]
  return list(regs)


def _record_name(record, split: str) -> str:
  return f"record image_id={int(record['image_id'])} of split {split!r}"


@dataclasses.dataclass(frozen=True)
class _Featurizer:
  """Turns (record, region) into one batch row; picklable for grain workers."""
  assets: Assets
  split: str
  num_views: int
  view_size: int
  max_caption_tokens: int
  max_prompt_tokens: int
  clip_max_tokens: int
  prompt_drop_prob: float
  tag_drop_prob: float
  context_views: bool
  context_crop: str = "union"
  context_order: str = "god"
  context_drop_iou: float = 0.0

  @classmethod
  def from_config(cls, config, assets: Assets, split: str) -> _Featurizer:
    d = config.data
    return cls(assets=assets, split=split, num_views=d.num_views, view_size=d.view_size,
               max_caption_tokens=d.max_caption_tokens, max_prompt_tokens=d.max_prompt_tokens,
               clip_max_tokens=d.clip_max_tokens, prompt_drop_prob=d.prompt_drop_prob,
               tag_drop_prob=d.tag_drop_prob, context_views=d.context_views,
               context_crop=d.context_crop, context_order=d.context_order,
               context_drop_iou=d.context_drop_iou)

  def image(self, record) -> np.ndarray:
    return transforms.decode_image(record["image"], name=_record_name(record, self.split))

  def context_pool(self, box: np.ndarray, pool, distances, objects, image_size):
    """A target's GOD candidates after `data.context_drop_iou`'s filter:
    (views float32[V', 4], distances[V'])."""
    if self.context_drop_iou > 0 and objects is not None:
      return god.drop_target_detections(pool, distances, box, objects,
                                        iou=self.context_drop_iou, image_size=image_size)
    return np.asarray(pool, np.float32).reshape(-1, 4), np.asarray(distances).reshape(-1)

  def select(self, box: np.ndarray, pool, distances, objects, image_size, *,
             rng: np.random.Generator | None = None) -> np.ndarray:
    """The j-1 context views of a target from its GOD candidates (`god.select_views`;
    `rng` given = training), after `context_pool`'s filter: float32[j-1, 4]."""
    pool, distances = self.context_pool(box, pool, distances, objects, image_size)
    return god.select_views(pool, distances, self.num_views - 1, train=rng is not None,
                            rng=rng, target_box=box)

  def views(self, image: np.ndarray, box: np.ndarray, candidates: np.ndarray,
            objects=None) -> dict:
    """Crops the target and its context views; `objects` (the record's detections)
    turn union views into the objects' own boxes with `data.context_crop="object"`."""
    if not self.context_views:  # the no-GOD ablation: every view is the target box
      candidates = np.broadcast_to(box, (self.num_views - 1, 4))
    outside = self.context_crop == "object"
    h, w = image.shape[:2]
    candidates = np.asarray(candidates, np.float32)
    # Each slot's object (the view itself where the detections are unknown).
    found = candidates
    if objects is not None and (outside or self.context_order == "nearest"):
      found = god.objects_of_views(candidates, box, objects, image_size=(w, h))
    if self.context_order == "nearest":
      order = god.nearest_first(box, found)
      candidates, found = candidates[order], found[order]
    if outside and objects is not None:
      candidates = found
    boxes = np.concatenate([box[None], candidates]).astype(np.float32)
    return {"views": transforms.crop_views(image, boxes, self.view_size),
            "view_boxes": transforms.box_in_views(box, boxes, self.view_size, outside=outside)}

  def text(self, caption: str) -> dict:
    a = self.assets
    ids, mask, truncated = tokenizer.encode_llm(a.llm_tokenizer, caption, self.max_caption_tokens,
                                                eos_id=a.eos_id, pad_id=a.pad_id)
    if truncated:
      _count("captions truncated", caption[:60])
    clip, clip_mask = tokenizer.encode_clip(a.clip_tokenizer, caption, self.clip_max_tokens)
    return {"caption_tokens": ids, "caption_mask": mask, "clip_tokens": clip,
            "clip_mask": clip_mask}

  def tag_labels(self, tag_ids, record) -> np.ndarray:
    v = len(self.assets.tag_vocab)
    ids = np.asarray(tag_ids, np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= v):
      raise ValueError(f"{_record_name(record, self.split)}: tag id {int(ids.max())} outside "
                       f"the {v}-word tag vocabulary")
    labels = np.zeros((v,), np.float32)
    labels[ids] = 1.0
    return labels

  def region(self, record, region: dict, rng: np.random.Generator | None,
             image: np.ndarray | None = None) -> dict | None:
    """One row; `rng` given = training (sampled views, dropped-out prompt), else eval."""
    caption = _text(region["caption"]).strip()
    if not caption:
      _count("empty captions skipped", _record_name(record, self.split))
      return None
    image = self.image(record) if image is None else image
    h, w = image.shape[:2]
    box = transforms.clip_box(region["bbox"], w, h)
    if box is None:
      _count("boxes without area skipped", f"{_record_name(record, self.split)} "
             f"region {int(region['id'])}")
      return None
    cands = self.select(box, region["views"], region["view_distance"], record.get("objects"),
                        (w, h), rng=rng)
    row = self.views(image, box, cands, record.get("objects"))
    row.update(self.text(caption))
    row["tag_labels"] = self.tag_labels(region["tag_ids"], record)
    if rng is None:
      row["prompt_tokens"] = np.zeros((self.max_prompt_tokens,), np.int32)
      row["prompt_mask"] = np.zeros((self.max_prompt_tokens,), np.int32)
    else:
      row["prompt_tokens"], row["prompt_mask"] = train_prompt(
          np.flatnonzero(row["tag_labels"]), self.assets, self.max_prompt_tokens, rng,
          prompt_drop_prob=self.prompt_drop_prob, tag_drop_prob=self.tag_drop_prob)
    row["region_id"] = np.int32(region["id"])
    row["image_id"] = np.int32(record["image_id"])
    row["valid"] = np.int32(1)
    return row


# ------------------------------------------------------------------ train


def _read_options(config, batch_size: int) -> grain.ReadOptions:
  """Reader threads (one per core, at most 16) and `prefetch_buffer_size` batches ahead."""
  threads = max(1, min(16, os.cpu_count() or 1))
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(
      threads, config.data.prefetch_buffer_size * batch_size))


def _rows(config, ds: grain.MapDataset, batch_size: int) -> grain.IterDataset:
  """Elements read by threads and, with `num_workers`, worker processes.

  Workers take elements round-robin, so the elements and their order do not
  depend on `num_workers`.
  """
  it = ds.to_iter_dataset(_read_options(config, batch_size))
  if config.data.num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return it


def _source(config, split: str) -> god_tfds.GodSource:
  """GOD records of `split` with images left encoded (decoded per region here)."""
  return god_tfds.load_source(config.data.name, split, data_dir(config), decode_image=False)


def region_index(config, split: str) -> np.ndarray:
  """int64[R, 2] (record index, region index) rows of the GOD dataset's split."""
  path = god_tfds.regions_index_path(config.data.name, split, data_dir(config))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"region index not found: {path} (run --mode prepare)")
  index = np.load(path)
  if index.ndim != 2 or index.shape[1] != 2:
    raise ValueError(f"{path}: expected int64[R, 2], got {index.dtype}{list(index.shape)}")
  return index


def num_train_regions(config) -> int:
  """Number of regions in `config.data.train_split` (one epoch of training rows)."""
  return len(region_index(config, config.data.train_split))


class _TrainRegion:
  """map_with_index fn: stream position -> training row of one region."""

  def __init__(self, source, index: np.ndarray, offset: int, featurizer: _Featurizer, seed: int):
    self._source, self._index, self._offset = source, index, offset
    self._featurizer, self._seed = featurizer, seed

  def __repr__(self) -> str:
    return (f"_TrainRegion(split={self._featurizer.split!r}, regions={len(self._index)}, "
            f"offset={self._offset}, seed={self._seed})")

  def __call__(self, position: int, local: int) -> dict | None:
    epoch = position // len(self._index)
    row = self._offset + int(local)
    rec_i, reg_i = (int(v) for v in self._index[int(local)])
    rng = np.random.default_rng([self._seed, epoch, row])
    record = self._source[rec_i]
    return self._featurizer.region(record, _regions(record)[reg_i], rng)


def make_train_iterator(config, assets: Assets, *, global_batch_size: int, process_index: int = 0,
                        process_count: int = 1, seed: int | None = None) -> grain.DatasetIterator:
  """Infinite, checkpointable iterator of this process's training batches.

  Args:
    config: full config (`config.data`).
    assets: from `load_assets`.
    global_batch_size: regions per step over all processes.
    process_index: this process's shard.
    process_count: number of processes; each reads its own rows of every
      global batch (the same batches as one process reading them all).
    seed: shuffle and augmentation seed (default `config.data.shuffle_buffer_seed`).

  Returns:
    A grain `DatasetIterator` (`get_state`/`set_state`; orbax saves it with
    `grain.checkpoint.CheckpointSave`) of batches of `global_batch_size //
    process_count` rows.
  """
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by "
                     f"process_count {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  seed = config.data.shuffle_buffer_seed if seed is None else seed
  split = config.data.train_split
  index = region_index(config, split)
  if len(index) < global_batch_size:
    raise ValueError(f"split {split!r} has {len(index)} regions, fewer than the global batch "
                     f"of {global_batch_size}")
  source = _source(config, split)
  fn = _TrainRegion(source, index, 0, _Featurizer.from_config(config, assets, split), seed)
  # One global stream (same seed on every process): global batch k is stream
  # rows [k*G, (k+1)*G); process p reads only its rows [k*G + p*b, k*G + (p+1)*b),
  # so P processes x b rows see exactly the batches of 1 process x G rows.
  per_process = global_batch_size // process_count
  ds = grain.MapDataset.range(len(index)).seed(seed).shuffle().repeat(None).map_with_index(fn)
  ds = ds.batch(per_process, drop_remainder=True)[process_index::process_count]
  return iter(_rows(config, ds, 1))


# ------------------------------------------------------------------ eval


def _eval_target_rows(config, split: str, max_examples: int) -> list[dict]:
  """Targets with the (record, region) of their first region, in record order."""
  source = _source(config, split)
  targets: dict[tuple, dict] = {}
  for rec_i in range(len(source)):
    record = source[rec_i]
    w, h = int(record["width"]), int(record["height"])
    for reg_i, region in enumerate(_regions(record)):
      caption = _text(region["caption"]).strip()
      box = transforms.clip_box(region["bbox"], w, h)
      if not caption or box is None:
        _count("eval regions skipped (empty caption or box)", _record_name(record, split))
        continue
      key = (int(record["image_id"]), tuple(box.tolist()))
      if key not in targets:
        targets[key] = {"image_id": key[0], "region_id": int(region["id"]),
                        "box": [float(v) for v in box], "references": [],
                        "_record": rec_i, "_region": reg_i}
      targets[key]["references"].append(caption)
  rows = list(targets.values())
  return rows[:max_examples] if max_examples > 0 else rows


def eval_targets(config, split: str, max_examples: int = 0) -> list[dict]:
  """Evaluation targets (one per distinct image and box), in batch order.

  Returns:
    dicts `{"image_id", "region_id", "box": [x1, y1, x2, y2], "references": [str]}`;
    `region_id` is the first region of the target.
  """
  return [{k: v for k, v in t.items() if not k.startswith("_")}
          for t in _eval_target_rows(config, split, max_examples)]


class _EvalTarget:
  """map fn: target -> eval row (views by greatest distance, prompt zero)."""

  def __init__(self, source, featurizer: _Featurizer):
    self._source, self._featurizer = source, featurizer

  def __repr__(self) -> str:
    return f"_EvalTarget(split={self._featurizer.split!r})"

  def __call__(self, target: dict) -> dict:
    record = self._source[target["_record"]]
    region = _regions(record)[target["_region"]]
    row = self._featurizer.region(record, region, None)
    if row is None:
      raise ValueError(f"{_record_name(record, self._featurizer.split)}: target region "
                       f"{target['region_id']} became invalid")
    return row


def _pad_batch(batch: dict, size: int) -> dict:
  n = len(batch["valid"])
  if n == size:
    return batch
  return {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}


def make_eval_iterator(config, assets: Assets, split: str, *, batch_size: int,
                       max_examples: int = 0):
  """Batches over `eval_targets(config, split, max_examples)`, in that order.

  The last batch is padded to `batch_size` with zero rows whose `valid` is 0.
  """
  targets = _eval_target_rows(config, split, max_examples)
  if not targets:
    raise ValueError(f"split {split!r} of {config.data.name}_god has no evaluation targets")
  source = _source(config, split)
  fn = _EvalTarget(source, _Featurizer.from_config(config, assets, split))
  it = _rows(config, grain.MapDataset.source(targets).map(fn), batch_size)
  return iter(it.batch(batch_size).map(functools.partial(_pad_batch, size=batch_size)))


def box_targets(config, split: str, boxes=None) -> list[dict]:
  """Boxes that are not regions (a detector's) as targets of `make_box_iterator`.

  Args:
    config: full config.
    split: data split whose images the boxes are on.
    boxes: dicts `{"image_id", "bbox": [x1, y1, x2, y2], ...}` (other keys
      kept); None: every record's own `objects` (the detections GOD used; on
      the synthetic set, its simulated detector) as `{"image_id", "bbox",
      "score", "label"}`.

  Returns:
    The boxes on images of `split` with area inside their image, in input
    order, each with its `bbox` clipped to the image and a `_record` index.
    Boxes on other images, or with no area inside theirs, are dropped and
    counted (`stats()`).
  """
  source = _source(config, split)
  images, objects = {}, []
  for rec_i in range(len(source)):
    record = source[rec_i]
    images[int(record["image_id"])] = (rec_i, int(record["width"]), int(record["height"]))
    objects.extend({"image_id": int(record["image_id"]), "bbox": o["bbox"].tolist(),
                    "score": float(o["score"]), "label": o["label"]}
                   for o in record["objects"])
  boxes = objects if boxes is None else boxes
  out = []
  for b in boxes:
    found = images.get(int(b["image_id"]))
    if found is None:
      _count("boxes on images outside the split skipped", f"image_id={b['image_id']}")
      continue
    box = transforms.clip_box(b["bbox"], found[1], found[2])
    if box is None:
      _count("boxes without area in their image skipped", f"image_id={b['image_id']}")
      continue
    out.append({**b, "bbox": [float(v) for v in box], "_record": found[0]})
  return out


class _BoxTarget:
  """map fn: box target -> eval row, context views proposed from the record's objects.

  The views are what GOD gives a region with the same box: `propose_views`
  over the record's objects (the detections GOD used), pHash distances, the
  j-1 greatest.
  """

  def __init__(self, source, featurizer: _Featurizer, top_k: int, score_threshold: float):
    self._source, self._featurizer = source, featurizer
    self._top_k, self._threshold = top_k, score_threshold

  def __repr__(self) -> str:
    return f"_BoxTarget(split={self._featurizer.split!r}, top_k={self._top_k})"

  def __call__(self, target: dict) -> dict:
    f = self._featurizer
    record = self._source[target["_record"]]
    image = f.image(record)
    h, w = image.shape[:2]
    box = np.asarray(target["bbox"], np.float32)
    pool = god.propose_views(box, record["objects"], top_k=self._top_k,
                             score_threshold=self._threshold, image_size=(w, h))
    cands = f.select(box, pool, god.view_distances(image, box, pool), record["objects"], (w, h))
    row = f.views(image, box, cands, record["objects"])
    for key, n in (("caption", f.max_caption_tokens), ("clip", f.clip_max_tokens),
                   ("prompt", f.max_prompt_tokens)):
      row[f"{key}_tokens"] = np.zeros((n,), np.int32)
      row[f"{key}_mask"] = np.zeros((n,), np.int32)
    row["tag_labels"] = np.zeros((len(f.assets.tag_vocab),), np.float32)
    row["region_id"] = np.int32(-1)
    row["image_id"] = np.int32(record["image_id"])
    row["valid"] = np.int32(1)
    return row


def make_box_iterator(config, assets: Assets, split: str, targets: list[dict], *,
                      batch_size: int):
  """Batches over `box_targets(...)` rows, in that order, for captioning any boxes.

  Rows have the eval layout (caption, CLIP, tag and prompt fields zero,
  `region_id` -1); the last batch is padded with `valid` 0 rows.
  """
  if not targets:
    raise ValueError(f"split {split!r}: no boxes to caption")
  fn = _BoxTarget(_source(config, split), _Featurizer.from_config(config, assets, split),
                  config.data.god_top_k, config.data.god_score_threshold)
  it = _rows(config, grain.MapDataset.source(targets).map(fn), batch_size)
  return iter(it.batch(batch_size).map(functools.partial(_pad_batch, size=batch_size)))


# ------------------------------------------------------------------ predict


def detections_to_objects(detections, name: str = "detections",
                          entry: str = "{name}[{i}]") -> list[dict]:
  """COCO-results detections -> GOD objects `{"label", "bbox" x1y1x2y2, "score"}`.

  Args:
    detections: a list of dicts with `bbox` [x, y, w, h] (finite, w and h > 0),
      optional `score` (default 1) and `label`, `category_name` or `category_id`.
    name: what to call the list in errors (a flag, a file or a request field).
    entry: how to call entry i of it (`{name}`, `{i}`).

  Raises:
    ValueError: naming `name`, the entry's index and what is wrong with it.
  """
  if not isinstance(detections, (list, tuple)):
    raise ValueError(f"{name}: expected a list of COCO-results detections, "
                     f"got {type(detections).__name__}")
  objects = []
  for i, d in enumerate(detections):
    where = entry.format(name=name, i=i)
    if not isinstance(d, dict):
      raise ValueError(f"{where}: expected an object with 'bbox', got {d!r}")
    try:
      x, y, w, h = (float(v) for v in d["bbox"])
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{where}: needs 'bbox' [x, y, w, h], got {d!r}") from e
    if not all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0:
      raise ValueError(f"{where}: 'bbox' [x, y, w, h] needs finite values and w, h > 0, "
                       f"got {d['bbox']!r}")
    try:
      score = float(d.get("score", 1.0))
    except (TypeError, ValueError) as e:
      raise ValueError(f"{where}: 'score' must be a number, got {d['score']!r}") from e
    label = d.get("label", d.get("category_name", d.get("category_id", "object")))
    objects.append({"label": str(label), "bbox": [x, y, x + w, y + h], "score": score})
  return objects


def make_predict_batch(config, assets: Assets, image, boxes, *,
                       detections=None) -> tuple[dict, list[str]]:
  """One batch row per box of one image, for `Captioner` and `--mode predict`.

  Args:
    config: full config.
    assets: from `load_assets`.
    image: path of an RGB/RGBA/grey PNG or JPEG of any size, or its decoded
      uint8[H, W, 3] array.
    boxes: float[N, 4] pixel boxes x1, y1, x2, y2.
    detections: COCO results (`bbox` x, y, w, h; `score`; `label`,
      `category_name` or `category_id`) of this image for the context views;
      None uses the target box for every view (with a warning).

  Returns:
    (batch, warnings). Caption, CLIP, tag and prompt fields are zero.

  Raises:
    FileNotFoundError / ValueError: missing or corrupt image (naming the file), a
      box wholly outside the image or of zero area.
  """
  if isinstance(image, (str, os.PathLike)):
    image_name, image = f" {image}", transforms.load_image_file(image)
  else:
    image_name, image = "", transforms.decode_image(image, name="image")
  h, w = image.shape[:2]
  boxes = np.asarray(boxes, np.float32)
  if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) == 0:
    raise ValueError(f"boxes must be float[N, 4] with N >= 1, got shape {list(boxes.shape)}")
  warnings: list[str] = []
  objects = None if detections is None else detections_to_objects(detections)
  if objects is None:
    warnings.append("no detections given: every view is the target box (no context views)")
  feat = _Featurizer.from_config(config, assets, "predict")
  rows = []
  for i, raw in enumerate(boxes):
    box = transforms.clip_box(raw, w, h)
    if box is None:
      raise ValueError(f"box {i} {raw.tolist()} is outside the {w}x{h} image{image_name} "
                       "or has zero area")
    if not np.allclose(box, raw):
      warnings.append(f"box {i} {raw.tolist()} is partly outside the {w}x{h} image; "
                      f"clipped to {box.tolist()}")
    if objects is None:
      cands = np.broadcast_to(box, (config.data.num_views - 1, 4))
    else:
      pool = god.propose_views(box, objects, top_k=config.data.god_top_k,
                               score_threshold=config.data.god_score_threshold,
                               image_size=(w, h))
      cands = feat.select(box, pool, god.view_distances(image, box, pool), objects, (w, h))
    row = feat.views(image, box, cands, objects)
    row.update({
        "caption_tokens": np.zeros((config.data.max_caption_tokens,), np.int32),
        "caption_mask": np.zeros((config.data.max_caption_tokens,), np.int32),
        "clip_tokens": np.zeros((config.data.clip_max_tokens,), np.int32),
        "clip_mask": np.zeros((config.data.clip_max_tokens,), np.int32),
        "tag_labels": np.zeros((len(assets.tag_vocab),), np.float32),
        "prompt_tokens": np.zeros((config.data.max_prompt_tokens,), np.int32),
        "prompt_mask": np.zeros((config.data.max_prompt_tokens,), np.int32),
        "region_id": np.int32(i), "image_id": np.int32(0), "valid": np.int32(1)})
    rows.append(row)
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}, warnings
