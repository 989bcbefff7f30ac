"""The grain pipeline on a tiny prepared synthetic dataset (+ small fakes)."""
from __future__ import annotations

import io
import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from aligncap_jax.config import base_config
from aligncap_jax.data import god, pipeline, tokenizer, transforms
from aligncap_jax.metrics import densecap

S = 28          # view size
T = 12          # max caption tokens
P = 10          # max prompt tokens


def _config(data_dir):
  c = base_config()
  c.data.data_dir = str(data_dir)
  c.data.synthetic.num_train_images = 12
  c.data.synthetic.num_validation_images = 3
  c.data.synthetic.num_test_images = 4
  c.data.synthetic.image_size = 64
  c.data.view_size = S
  c.data.max_caption_tokens = T
  c.data.max_prompt_tokens = P
  c.data.tag_vocab_size = 30
  c.data.god_top_k = 4
  c.model.llm.eos_token_id = 1
  c.model.llm.pad_token_id = 0
  return c


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  config = _config(tmp_path_factory.mktemp("tfds"))
  pipeline.prepare(config)
  return config, pipeline.load_assets(config)


def _regions_by_id(config, split):
  source = pipeline._source(config, split)
  out = {}
  for i in range(len(source)):
    rec = source[i]
    for reg in rec["regions"]:
      out[reg["id"]] = (rec, reg)
  return out


def test_prepare_writes_everything_and_reuses_it(prepared):
  config, assets = prepared
  tok_path = pipeline.dataset_tokenizer_path(config)
  before = os.path.getmtime(tok_path)
  pipeline.prepare(config)
  assert os.path.getmtime(tok_path) == before
  assert tokenizer.load(tok_path).token_to_id("</s>") == 1
  assert assets.pad_id == 0 and assets.eos_id == 1
  assert (assets.comma_id, assets.bar_id) == (3, 4)
  v = len(assets.tag_vocab)
  assert 5 <= v <= 30 and "circle" in assets.tag_vocab
  assert assets.tag_clip_tokens.shape == (v, 77) and assets.tag_clip_mask.shape == (v, 77)
  for i, tag in enumerate(assets.tag_vocab):
    ids = tokenizer.encode_words(assets.llm_tokenizer, tag)
    np.testing.assert_array_equal(assets.tag_token_table[i, :assets.tag_token_lens[i]], ids)
    n = assets.tag_clip_mask[i].sum()
    assert assets.tag_clip_tokens[i, n - 1] == 1     # CLIP ids end with EOS


def test_god_settings_changed_in_the_config_rebuild_or_are_refused(tmp_path):
  """A GOD dataset is reused only if it was built with the config's settings."""
  config = _config(tmp_path)
  pipeline.prepare(config)
  assert pipeline._god_settings_match(config)
  config.data.god_top_k = 1
  assert not pipeline._god_settings_match(config)
  with pytest.raises(ValueError, match=r"other settings.*data\.god_top_k=1"):
    pipeline.prepare(config, build_missing_synthetic=False)
  pipeline.prepare(config)   # may build: rebuilds with the new setting
  assert pipeline._god_settings_match(config)


def test_real_dataset_without_god_says_run_prepare(tmp_path):
  config = _config(tmp_path)
  config.data.name = "visual_genome_regions"
  with pytest.raises(FileNotFoundError, match="--mode prepare"):
    pipeline.prepare(config)


def test_missing_tokenizer_file_is_named(prepared):
  config, _ = prepared
  config = _config(config.data.data_dir)
  config.data.llm_tokenizer = "/nonexistent/tok.json"
  with pytest.raises(FileNotFoundError, match="/nonexistent/tok.json"):
    pipeline.load_assets(config)


def _check_common_fields(batch, b, v):
  shapes = {"views": ((b, 3, S, S, 3), np.uint8), "view_boxes": ((b, 3, 4), np.float32),
            "caption_tokens": ((b, T), np.int32), "caption_mask": ((b, T), np.int32),
            "clip_tokens": ((b, 77), np.int32), "clip_mask": ((b, 77), np.int32),
            "tag_labels": ((b, v), np.float32), "prompt_tokens": ((b, P), np.int32),
            "prompt_mask": ((b, P), np.int32), "region_id": ((b,), np.int32),
            "image_id": ((b,), np.int32), "valid": ((b,), np.int32)}
  assert set(batch) == set(shapes)
  for k, (shape, dtype) in shapes.items():
    assert batch[k].shape == shape and batch[k].dtype == dtype, k
  assert np.all((batch["view_boxes"] >= 0) & (batch["view_boxes"] <= S))
  assert set(np.unique(batch["tag_labels"])) <= {0.0, 1.0}
  for m in ("caption_mask", "clip_mask", "prompt_mask"):
    assert set(np.unique(batch[m])) <= {0, 1}
    # masks are a prefix of ones
    assert np.all(np.diff(batch[m], axis=1) <= 0)


def test_train_batch_fields_and_geometry(prepared):
  config, assets = prepared
  it = pipeline.make_train_iterator(config, assets, global_batch_size=4)
  batch = next(it)
  _check_common_fields(batch, 4, len(assets.tag_vocab))
  assert np.all(batch["valid"] == 1)
  regions = _regions_by_id(config, "train")
  for r in range(4):
    rec, reg = regions[int(batch["region_id"][r])]
    assert rec["image_id"] == batch["image_id"][r]
    image = transforms.decode_image(rec["image"], name="t")
    box = transforms.clip_box(reg["bbox"], rec["width"], rec["height"])
    # view 0 is the target itself
    np.testing.assert_allclose(batch["view_boxes"][r, 0], [0, 0, S, S], atol=1e-4)
    np.testing.assert_array_equal(batch["views"][r, 0], transforms.crop_resize(image, box, S))
    # other views: one of the GOD candidates (or the target) with the target in its pixels
    pool = [box] + list(reg["views"])
    for k in (1, 2):
      hits = [v for v in pool
              if np.allclose(transforms.box_in_views(box, [v], S)[0], batch["view_boxes"][r, k],
                             atol=1e-4)
              and np.array_equal(transforms.crop_resize(image, v, S), batch["views"][r, k])]
      assert hits, (r, k)
    # caption ids + EOS
    n = batch["caption_mask"][r].sum()
    assert batch["caption_tokens"][r, n - 1] == 1
    assert np.all(batch["caption_tokens"][r, n:] == 0)
    assert assets.llm_tokenizer.decode(batch["caption_tokens"][r, :n - 1].tolist()) == reg["caption"]
    # tag labels = the region's GOD tag ids
    np.testing.assert_array_equal(np.flatnonzero(batch["tag_labels"][r]), np.sort(reg["tag_ids"]))
    # prompt: ends with "|", EOS and uses only the region's tags (a dropped prompt
    # is the no-tag prompt, "|" and EOS)
    m = batch["prompt_mask"][r].sum()
    assert m >= 2 and np.all(batch["prompt_tokens"][r, m:] == 0)
    toks = batch["prompt_tokens"][r, :m].tolist()
    assert toks[-2:] == [assets.bar_id, assets.eos_id]
    allowed = {assets.comma_id} | {
        int(t) for i in reg["tag_ids"] for t in assets.tag_token_table[i, :assets.tag_token_lens[i]]}
    assert set(toks[:-2]) <= allowed


def test_train_iterator_covers_each_epoch_and_reshuffles(prepared):
  config, assets = prepared
  n = len(pipeline.region_index(config, "train"))
  it = pipeline.make_train_iterator(config, assets, global_batch_size=1, seed=5)
  ep1 = [int(next(it)["region_id"][0]) for _ in range(n)]
  ep2 = [int(next(it)["region_id"][0]) for _ in range(n)]
  assert len(set(ep1)) == n and set(ep1) == set(ep2)
  assert ep1 != ep2
  again = pipeline.make_train_iterator(config, assets, global_batch_size=1, seed=5)
  assert [int(next(again)["region_id"][0]) for _ in range(n)] == ep1


def test_train_iterator_orbax_round_trip(prepared, tmp_path):
  config, assets = prepared
  it = pipeline.make_train_iterator(config, assets, global_batch_size=4)
  for _ in range(3):
    next(it)
  mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data",))
  mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = [next(it) for _ in range(4)]    # crosses an epoch boundary
  fresh = pipeline.make_train_iterator(config, assets, global_batch_size=4)
  restored = mngr.restore(3, args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointRestore(fresh)))["data"]
  for want in expected:
    got = next(restored)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  mngr.close()


def test_two_processes_read_their_rows_of_the_same_global_batches(prepared):
  config, assets = prepared
  whole = pipeline.make_train_iterator(config, assets, global_batch_size=4)
  shards = [pipeline.make_train_iterator(config, assets, global_batch_size=4, process_index=p,
                                         process_count=2) for p in range(2)]
  for _ in range(5):
    want = next(whole)
    parts = [next(it) for it in shards]
    for k in want:
      np.testing.assert_array_equal(np.concatenate([q[k] for q in parts]), want[k], err_msg=k)
  with pytest.raises(ValueError, match="divisible"):
    pipeline.make_train_iterator(config, assets, global_batch_size=3, process_count=2)


def test_eval_batches_padding_order_and_views(prepared):
  config, assets = prepared
  targets = pipeline.eval_targets(config, "test")
  batches = list(pipeline.make_eval_iterator(config, assets, "test", batch_size=4))
  assert len(batches) == -(-len(targets) // 4)
  valid = np.concatenate([b["valid"] for b in batches])
  assert valid.sum() == len(targets) and np.all(valid[:len(targets)] == 1)
  assert np.all(valid[len(targets):] == 0)
  ids = np.concatenate([b["region_id"] for b in batches])[:len(targets)]
  assert ids.tolist() == [t["region_id"] for t in targets]
  last = batches[-1]
  pad = last["valid"] == 0
  if pad.any():
    assert all(np.all(v[pad] == 0) for v in last.values())
  regions = _regions_by_id(config, "test")
  for b in batches:
    _check_common_fields(b, 4, len(assets.tag_vocab))
    assert np.all(b["prompt_tokens"] == 0) and np.all(b["prompt_mask"] == 0)
    for r in np.flatnonzero(b["valid"]):
      rec, reg = regions[int(b["region_id"][r])]
      box = transforms.clip_box(reg["bbox"], rec["width"], rec["height"])
      want = god.select_views(reg["views"], reg["view_distance"], 2, train=False, target_box=box)
      np.testing.assert_allclose(b["view_boxes"][r, 1:],
                                 transforms.box_in_views(box, want, S), atol=1e-5)
  few = list(pipeline.make_eval_iterator(config, assets, "test", batch_size=4, max_examples=2))
  assert len(few) == 1 and few[0]["valid"].tolist() == [1, 1, 0, 0]
  assert len(pipeline.eval_targets(config, "test", max_examples=2)) == 2


def _png(arr, mode=None):
  buf = io.BytesIO()
  Image.fromarray(arr, mode).save(buf, format="PNG")
  return buf.getvalue()


def _fake_records():
  img = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
  none = np.zeros((0, 4), np.float32)

  def reg(i, box, caption, tags=()):
    return {"id": i, "bbox": np.array(box, np.float32), "caption": caption, "views": none,
            "view_distance": np.zeros((0,), np.int32), "tag_ids": np.array(tags, np.int32)}

  return [
      {"image": _png(img), "image_id": 7, "width": 50, "height": 40, "objects": [],
       "regions": [reg(70, [1, 2, 20, 30], "a red circle", [0]),
                   reg(71, [5, 5, 15, 15], "   "),                     # empty caption
                   reg(72, [1, 2, 20, 30], "the red ball"),            # same box as 70
                   reg(73, [60, 50, 80, 70], "outside"),               # no area in image
                   reg(74, [0, 0, 10, 10], "a blue square")]},
      {"image": _png(img), "image_id": 8, "width": 50, "height": 40, "objects": [],
       "regions": [reg(80, [1, 2, 20, 30], "a red circle")]},       # same box, other image
  ]


def test_duplicate_boxes_are_one_target_and_bad_regions_are_skipped(prepared, monkeypatch):
  config, assets = prepared
  records = _fake_records()
  monkeypatch.setattr(pipeline, "_source", lambda config, split: records)
  before = pipeline.stats()
  targets = pipeline.eval_targets(config, "fake")
  assert [(t["image_id"], t["region_id"]) for t in targets] == [(7, 70), (7, 74), (8, 80)]
  assert targets[0]["references"] == ["a red circle", "the red ball"]
  assert targets[0]["box"] == [1.0, 2.0, 20.0, 30.0]
  after = pipeline.stats()
  key = "eval regions skipped (empty caption or box)"
  assert after.get(key, 0) - before.get(key, 0) == 2
  batch = next(pipeline.make_eval_iterator(config, assets, "fake", batch_size=4))
  assert batch["region_id"].tolist() == [70, 74, 80, 0]
  assert batch["valid"].tolist() == [1, 1, 1, 0]
  # No GOD candidates: every view is the target.
  np.testing.assert_array_equal(batch["views"][0, 1], batch["views"][0, 0])
  # Training rows of bad regions are skipped and counted.
  feat = pipeline._Featurizer.from_config(config, assets, "fake")
  rng = np.random.default_rng(0)
  assert feat.region(records[0], records[0]["regions"][1], rng) is None
  assert feat.region(records[0], records[0]["regions"][3], rng) is None
  assert pipeline.stats()["empty captions skipped"] >= 1
  assert pipeline.stats()["boxes without area skipped"] >= 1
  bad = dict(records[0], image=b"garbage")
  with pytest.raises(ValueError, match="image_id=7"):
    feat.region(bad, bad["regions"][0], rng)


def _toy_assets():
  tok = tokenizer.train_word_level(["big dog red circle"])
  return pipeline.make_assets(tok, tok, ["red", "circle", "big dog"], eos_id=1, pad_id=0,
                              clip_max_tokens=77, max_prompt_tokens=P)


def test_build_prompt_by_hand():
  a = _toy_assets()
  w = a.llm_tokenizer.token_to_id
  toks, mask = pipeline.build_prompt([2, 0], a, 8)
  want = [w("big"), w("dog"), a.comma_id, w("red"), a.bar_id, a.eos_id]
  assert toks.tolist() == want + [0, 0] and mask.tolist() == [1] * 6 + [0, 0]
  toks, mask = pipeline.build_prompt([2, 0], a, 4)         # cut, EOS kept last
  assert toks.tolist() == [w("big"), w("dog"), a.comma_id, a.eos_id] and mask.sum() == 4
  toks, mask = pipeline.build_prompt([], a, 5)
  assert toks.tolist() == [a.bar_id, a.eos_id, 0, 0, 0] and mask.sum() == 2
  assert a.tag_token_table.shape == (3, 2)
  assert a.tag_token_lens.tolist() == [1, 1, 2]


def test_train_prompt_dropout_statistics():
  a = _toy_assets()
  w = a.llm_tokenizer.token_to_id
  rng = np.random.default_rng(123)
  empty = pipeline.build_prompt([], a, P)
  n_empty, kept, orders, n = 0, np.zeros(3), set(), 4000
  first = {w("red"): 0, w("circle"): 1, w("big"): 2}
  for _ in range(n):
    toks, mask = pipeline.train_prompt([0, 1, 2], a, P, rng, prompt_drop_prob=0.5,
                                       tag_drop_prob=0.5)
    present = [first[t] for t in toks[:mask.sum()].tolist() if t in first]
    if not present:
      # A dropped prompt is the no-tag prompt inference builds, never all padding.
      np.testing.assert_array_equal(toks, empty[0])
      np.testing.assert_array_equal(mask, empty[1])
      n_empty += 1
      continue
    kept[present] += 1
    orders.add(tuple(present))
  # Empty: dropped (0.5), or kept with all 3 tags dropped (0.5 * 0.5 ** 3).
  # Binomial(4000, 0.5625) has std 0.0078; 0.04 is 5 std.
  assert abs(n_empty / n - 0.5625) < 0.04
  # Each tag kept with 0.5 among the kept prompts that are not empty: 0.5 / (1 - 0.125).
  np.testing.assert_allclose(kept / (n - n_empty), 0.5 / 0.875, atol=0.05)
  assert (0, 1) in orders and (1, 0) in orders          # kept tags are shuffled
  rng = np.random.default_rng(0)
  full = pipeline.train_prompt([0, 2], a, P, rng, prompt_drop_prob=0.0, tag_drop_prob=0.0)[0]
  assert sorted(full[:6].tolist()) == sorted(pipeline.build_prompt([0, 2], a, P)[0][:6].tolist())
  none = pipeline.train_prompt([0, 2], a, P, rng, prompt_drop_prob=1.0, tag_drop_prob=0.0)
  assert none[0].tolist() == empty[0].tolist() and none[1].tolist() == empty[1].tolist()


def test_predict_batch(prepared, tmp_path):
  config, assets = prepared
  rgba = np.zeros((45, 70, 4), np.uint8)
  rgba[..., 3] = 255
  rgba[10:30, 40:60, :3] = 200
  path = tmp_path / "img.png"
  path.write_bytes(_png(rgba, "RGBA"))
  batch, warns = pipeline.make_predict_batch(config, assets, str(path),
                                             [[5, 5, 30, 40], [60, 20, 90, 44]])
  _check_common_fields(batch, 2, len(assets.tag_vocab))
  assert any("no detections" in m for m in warns)
  assert any("box 1" in m and "clipped" in m for m in warns)
  for r in range(2):
    for k in (1, 2):
      np.testing.assert_array_equal(batch["views"][r, k], batch["views"][r, 0])
  dets = [{"image_id": 1, "category_id": 3, "bbox": [40, 10, 20, 20], "score": 0.9}]
  batch, warns = pipeline.make_predict_batch(config, assets, str(path), [[5, 5, 30, 40]],
                                             detections=dets)
  assert not warns
  np.testing.assert_allclose(batch["view_boxes"][0, 1],
                             transforms.box_in_views([5, 5, 30, 40], [[5, 5, 60, 40]], S)[0])
  grey = tmp_path / "grey.jpg"
  Image.fromarray(np.full((33, 17), 90, np.uint8)).save(grey)
  batch, _ = pipeline.make_predict_batch(config, assets, str(grey), [[0, 0, 17, 33]])
  assert batch["views"].shape == (1, 3, S, S, 3)
  with pytest.raises(ValueError, match="outside"):
    pipeline.make_predict_batch(config, assets, str(path), [[80, 50, 90, 60]])
  with pytest.raises(ValueError, match="zero area"):
    pipeline.make_predict_batch(config, assets, str(path), [[10, 10, 10, 20]])
  with pytest.raises(FileNotFoundError, match="missing.png"):
    pipeline.make_predict_batch(config, assets, str(tmp_path / "missing.png"), [[0, 0, 5, 5]])
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
  with pytest.raises(ValueError, match="bad.png"):
    pipeline.make_predict_batch(config, assets, str(bad), [[0, 0, 5, 5]])


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(prepared):
  config, assets = prepared
  want = pipeline.make_train_iterator(config, assets, global_batch_size=4)
  want = [next(want) for _ in range(2)]
  config = _config(config.data.data_dir)
  config.data.num_workers = 2
  it = pipeline.make_train_iterator(config, assets, global_batch_size=4)
  for w in want:
    got = next(it)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k], err_msg=k)


def test_context_reach_counts_views_that_hold_the_neighbour(prepared):
  from aligncap_jax.data import context_reach  # pylint: disable=g-import-not-at-top
  config, _ = prepared
  got = context_reach.context_reach(config, "train")
  assert 0 < got["context_in_eval_views"] <= got["context_in_any_view"] <= 1
  # No candidate slot: no view can show the neighbour.
  one = _config(config.data.data_dir)
  one.data.num_views = 1
  assert context_reach.context_reach(one, "train")["context_in_eval_views"] == 0
  # As many slots as candidates: eval sees every stored view.
  many = _config(config.data.data_dir)
  many.data.num_views = 64
  wide = context_reach.context_reach(many, "train")
  assert wide["context_in_eval_views"] == wide["context_in_any_view"] == got["context_in_any_view"]


def test_object_context_crop_views_are_the_detected_objects(prepared):
  config, assets = prepared
  obj = _config(config.data.data_dir)
  obj.data.context_crop = "object"
  obj.model.candidate_pool = "whole_view"
  union_b = next(pipeline.make_eval_iterator(config, assets, "test", batch_size=4))
  obj_b = next(pipeline.make_eval_iterator(obj, assets, "test", batch_size=4))
  near = _config(config.data.data_dir)   # the same views, nearest object first
  near.data.context_crop = "object"
  near.model.candidate_pool = "whole_view"
  near.data.context_order = "nearest"
  near_b = next(pipeline.make_eval_iterator(near, assets, "test", batch_size=4))
  np.testing.assert_array_equal(obj_b["views"][:, 0], union_b["views"][:, 0])
  np.testing.assert_array_equal(obj_b["view_boxes"][:, 0], union_b["view_boxes"][:, 0])
  source = pipeline._source(config, "test")
  changed = 0
  for row, t in enumerate(pipeline._eval_target_rows(config, "test", 4)):
    rec = source[t["_record"]]
    reg = pipeline._regions(rec)[t["_region"]]
    box = np.asarray(t["box"], np.float32)
    unions = god.select_views(reg["views"], reg["view_distance"], config.data.num_views - 1,
                              train=False, target_box=box)
    w, h = rec["width"], rec["height"]
    want = god.objects_of_views(unions, box, rec["objects"], image_size=(w, h))
    boxes = np.concatenate([box[None], want])
    image = transforms.decode_image(rec["image"], name="test")
    np.testing.assert_array_equal(obj_b["views"][row], transforms.crop_views(image, boxes, S))
    np.testing.assert_allclose(
        obj_b["view_boxes"][row], transforms.box_in_views(box, boxes, S, outside=True))
    for o, u in zip(want, unions):
      if not np.allclose(u, box):  # a context view: the object, not the union
        assert any(np.allclose(o, np.clip(x["bbox"], 0, [w, h, w, h])) for x in rec["objects"])
        changed += int(not np.allclose(o, u))
    order = god.nearest_first(box, want)
    d = np.sum(((want[:, :2] + want[:, 2:]) / 2 - (box[:2] + box[2:]) / 2) ** 2, axis=1)
    real = ~np.all(np.isclose(want, box[None]), axis=1)
    assert np.all(np.diff(d[order][real[order]]) >= 0) and np.all(real[order][:real.sum()])
    near_boxes = np.concatenate([box[None], want[order]])
    np.testing.assert_array_equal(near_b["views"][row], transforms.crop_views(image, near_boxes, S))
    np.testing.assert_allclose(near_b["view_boxes"][row],
                               transforms.box_in_views(box, near_boxes, S, outside=True))
  assert changed > 0  # some context view became an object box smaller than its union
  bad = _config(config.data.data_dir)
  bad.data.context_crop = "object"
  with pytest.raises(ValueError, match="data.context_crop.*candidate_pool"):
    from aligncap_jax import config as config_lib  # pylint: disable=g-import-not-at-top
    config_lib.validate(bad)


def test_context_drop_iou_removes_the_targets_own_detection(prepared):
  """IoU is kept by the crop's axis-aligned scaling: a context view's box of the
  target (outside=True frame) overlaps [0, S]^2 as the target overlaps the object."""
  from aligncap_jax.data import context_reach  # pylint: disable=g-import-not-at-top
  config, assets = prepared

  def self_views(cfg):
    n = 0
    batches = [next(pipeline.make_train_iterator(cfg, assets, global_batch_size=16))]
    batches += list(pipeline.make_eval_iterator(cfg, assets, "train", batch_size=16))
    for b in batches:
      for i in np.flatnonzero(b["valid"]):
        for k in range(1, cfg.data.num_views):
          if np.array_equal(b["views"][i, k], b["views"][i, 0]):
            continue  # a filler slot: the target box itself
          n += densecap.pairwise_iou(b["view_boxes"][i, k], [0, 0, S, S], "continuous")[0, 0] >= 0.5
    return n

  obj = _config(config.data.data_dir)
  obj.data.context_crop = "object"
  obj.model.candidate_pool = "whole_view"
  obj.data.num_views = 4
  assert self_views(obj) > 0        # the detector's box of the target is a view
  obj.data.context_drop_iou = 0.5
  assert self_views(obj) == 0
  reach = context_reach.context_reach(obj, "train")
  assert 0 < reach["context_in_eval_views"] <= reach["context_in_any_view"] <= 1
  obj.data.num_views = 64
  wide = context_reach.context_reach(obj, "train")
  assert wide["context_in_eval_views"] == wide["context_in_any_view"]
  from aligncap_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  obj.data.context_drop_iou = 1.5
  with pytest.raises(ValueError, match="data.context_drop_iou"):
    config_lib.validate(obj)
  obj.data.context_drop_iou = 0.5
  obj.data.context_order = "far"
  with pytest.raises(ValueError, match="data.context_order"):
    config_lib.validate(obj)
