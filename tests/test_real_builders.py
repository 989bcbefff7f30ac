"""VG v1.2 and RefCOCOg builders on tiny files written in the real formats."""
from __future__ import annotations

import io
import json
import pickle

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from aligncap_jax.data import builders


def _jpeg(path, w, h, seed):
  path.parent.mkdir(parents=True, exist_ok=True)
  arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="JPEG")
  path.write_bytes(buf.getvalue())
  return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _corrupt(path):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")


def _read(name, data_dir, split):
  builder = tfds.core.read_only_builder.builder_from_files(name, data_dir=data_dir)
  source = builder.as_data_source(split)
  return builder, {int(r["image_id"]): r for r in grain.MapDataset.source(source)}


def _text(v):
  return v.decode() if isinstance(v, bytes) else str(v)


# ------------------------------------------------------------------ Visual Genome


def _region(rid, iid, x, y, w, h, phrase):
  return {"region_id": rid, "image_id": iid, "x": x, "y": y, "width": w, "height": h,
          "phrase": phrase}


def _vg_object(oid, x, y, w, h, names):
  return {"object_id": oid, "x": x, "y": y, "w": w, "h": h, "names": names,
          "synsets": [f"{n}.n.01" for n in names]}


@pytest.fixture(scope="module")
def vg_manual(tmp_path_factory):
  d = tmp_path_factory.mktemp("vg")
  pixels = {1: _jpeg(d / "VG_100K" / "1.jpg", 40, 30, 1),
            2: _jpeg(d / "VG_100K_2" / "2.jpg", 24, 20, 2),
            4: _jpeg(d / "VG_100K" / "4.jpg", 16, 16, 4),
            5: _jpeg(d / "VG_100K_2" / "5.jpg", 18, 12, 5)}
  _corrupt(d / "VG_100K" / "3.jpg")
  sizes = {1: (40, 30), 2: (24, 20), 3: (10, 10), 4: (16, 16), 5: (18, 12)}
  (d / "image_data.json").write_text(json.dumps([
      {"width": w, "height": h, "url": f"https://x/{i}.jpg", "image_id": i, "coco_id": None,
       "flickr_id": None} for i, (w, h) in sizes.items()]))
  (d / "region_descriptions.json").write_text(json.dumps([
      {"id": 1, "regions": [_region(11, 1, 3, 2, 10, 5, "A red ball"),
                            _region(12, 1, 35, 20, 20, 20, "sky past the edge"),  # clipped
                            _region(13, 1, 50, 5, 5, 5, "outside"),                # zero area
                            _region(14, 1, 1, 1, 5, 5, "  ")]},                    # empty
      {"id": 2, "regions": [_region(21, 2, 0, 0, 24, 20, "whole picture")]},
      {"id": 3, "regions": [_region(31, 3, 0, 0, 5, 5, "never read")]},
      {"id": 4, "regions": [_region(41, 4, 2, 2, 4, 4, "test region")]},
      {"id": 5, "regions": [_region(51, 5, 1, 1, 3, 3, "val region")]}]))
  (d / "objects.json").write_text(json.dumps([
      {"image_id": 1, "image_url": "https://x/1.jpg",
       "objects": [_vg_object(101, 3, 2, 10, 5, ["ball", "toy"]),
                   _vg_object(102, 30, 25, 30, 30, ["tree"]),
                   _vg_object(103, 0, 0, 0, 4, ["line"])]},
      {"image_id": 2, "image_url": "https://x/2.jpg", "objects": []},
      {"image_id": 4, "image_url": "https://x/4.jpg", "objects": []},
      {"image_id": 5, "image_url": "https://x/5.jpg", "objects": []}]))
  (d / "densecap_splits.json").write_text(json.dumps({"train": [1, 2, 3], "val": [5],
                                                      "test": [4]}))
  return d, pixels


def test_visual_genome_builder_fields_and_log(vg_manual, tmp_path):
  manual, pixels = vg_manual
  out = builders.prepare("visual_genome_regions", data_dir=str(tmp_path),
                         manual_dir=str(manual))
  builder, train = _read("visual_genome_regions", str(tmp_path), "train")
  assert sorted(builder.info.splits) == ["test", "train", "validation"]
  assert sorted(train) == [1, 2]
  rec = train[1]
  np.testing.assert_array_equal(rec["image"], pixels[1])
  assert (rec["width"], rec["height"]) == (40, 30)
  assert list(rec["regions"]["id"]) == [11, 12]
  assert [_text(c) for c in rec["regions"]["caption"]] == ["A red ball", "sky past the edge"]
  np.testing.assert_array_equal(np.stack(rec["regions"]["bbox"]),
                                [[3, 2, 13, 7], [35, 20, 40, 30]])
  assert [_text(l) for l in rec["objects"]["label"]] == ["ball", "tree"]
  np.testing.assert_array_equal(np.stack(rec["objects"]["bbox"]), [[3, 2, 13, 7], [30, 25, 40, 30]])
  np.testing.assert_array_equal(rec["objects"]["score"], [1.0, 1.0])
  assert len(train[2]["objects"]["label"]) == 0
  np.testing.assert_array_equal(train[2]["image"], pixels[2])
  _, val = _read("visual_genome_regions", str(tmp_path), "validation")
  assert sorted(val) == [5] and list(val[5]["regions"]["id"]) == [51]
  log = builders.load_build_log(out, "train")
  assert log["counts"] == {"images_listed": 3, "skipped_images": 1, "images": 2, "regions": 3,
                           "regions_dropped_zero_area": 1, "regions_dropped_empty_phrase": 1,
                           "objects": 2, "objects_dropped_zero_area": 1}
  assert len(log["skipped_images"]) == 1
  assert log["skipped_images"][0]["image_id"] == 3
  assert log["skipped_images"][0]["path"].endswith("VG_100K/3.jpg")


def test_visual_genome_strict_raises_on_corrupt_image(vg_manual, tmp_path):
  with pytest.raises(OSError, match="3.jpg"):
    builders.prepare("visual_genome_regions", data_dir=str(tmp_path),
                     manual_dir=str(vg_manual[0]), strict=True)


def test_visual_genome_missing_files_listed(tmp_path):
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "objects.json").write_text("[]")
  with pytest.raises(FileNotFoundError) as err:
    builders.prepare("visual_genome_regions", data_dir=str(tmp_path / "tfds"),
                     manual_dir=str(tmp_path / "manual"))
  msg = str(err.value)
  assert ("['image_data.json', 'region_descriptions.json', 'densecap_splits.json', "
          "'VG_100K/', 'VG_100K_2/']") in msg
  assert str(tmp_path / "manual") in msg


def test_visual_genome_split_file_region_subset_and_image_lists(vg_manual, tmp_path):
  manual, _ = vg_manual
  # GLaMM-style test_caption.json: one COCO "image" per region, file_name <VG id>.jpg.
  subset = tmp_path / "test_caption.json"
  subset.write_text(json.dumps({
      "images": [{"id": 7, "file_name": "1.jpg"}, {"id": 8, "file_name": "4.jpg"},
                 {"id": 9, "file_name": "1.jpg"}],
      "annotations": [{"id": 7, "image_id": 7, "bbox": [3, 2, 10, 5], "caption": "a red ball"},
                      {"id": 8, "image_id": 8, "bbox": [2, 2, 4, 4], "caption": "a tile"},
                      {"id": 9, "image_id": 9, "bbox": [0, 0, 8, 6], "caption": "corner"}]}))
  builders.prepare("visual_genome_regions", data_dir=str(tmp_path / "a"),
                   manual_dir=str(manual), split_file=str(subset))
  _, test = _read("visual_genome_regions", str(tmp_path / "a"), "test")
  assert sorted(test) == [1, 4]      # the subset's images, only the listed regions
  assert list(test[1]["regions"]["id"]) == [7, 9]
  assert [_text(c) for c in test[1]["regions"]["caption"]] == ["a red ball", "corner"]
  np.testing.assert_array_equal(np.stack(test[1]["regions"]["bbox"]),
                                [[3, 2, 13, 7], [0, 0, 8, 6]])
  _, train = _read("visual_genome_regions", str(tmp_path / "a"), "train")
  assert sorted(train) == [1, 2]     # train and val still from densecap_splits.json
  with pytest.raises(ValueError, match="built with splits from .*test_caption.json"):
    builders.prepare("visual_genome_regions", data_dir=str(tmp_path / "a"),
                     manual_dir=str(manual))
  # DenseCap-form split file: image id lists replace densecap_splits.json.
  lists = tmp_path / "splits.json"
  lists.write_text(json.dumps({"train": [2], "val": [5], "test": [1, 4]}))
  builders.prepare("visual_genome_regions", data_dir=str(tmp_path / "b"),
                   manual_dir=str(manual), split_file=str(lists))
  _, test = _read("visual_genome_regions", str(tmp_path / "b"), "test")
  assert sorted(test) == [1, 4] and list(test[1]["regions"]["id"]) == [11, 12]
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": []}))
  with pytest.raises(ValueError, match=r"images\[0\] needs 'id' and 'file_name'"):
    builders.prepare("visual_genome_regions", data_dir=str(tmp_path / "c"),
                     manual_dir=str(manual), split_file=str(bad))


# ------------------------------------------------------------------ RefCOCOg


def _coco_path(d, iid):
  return d / "train2014" / f"COCO_train2014_{iid:012d}.jpg"


def _ref(ref_id, iid, ann_id, split, sents):
  return {"ref_id": ref_id, "image_id": iid, "ann_id": ann_id, "split": split,
          "category_id": 1, "file_name": f"COCO_train2014_{iid:012d}_{ann_id}.jpg",
          "sent_ids": [s[0] for s in sents],
          "sentences": [{"sent_id": sid, "sent": text, "raw": text, "tokens": text.split()}
                        for sid, text in sents]}


@pytest.fixture(scope="module")
def refcocog_manual(tmp_path_factory):
  d = tmp_path_factory.mktemp("refcocog")
  pixels = {1: _jpeg(_coco_path(d, 1), 32, 24, 1), 2: _jpeg(_coco_path(d, 2), 20, 20, 2),
            4: _jpeg(_coco_path(d, 4), 16, 12, 4)}
  _corrupt(_coco_path(d, 3))
  refs = [_ref(0, 1, 101, "train", [(0, "the red ball on the left"), (1, "red ball")]),
          _ref(1, 1, 102, "train", [(2, "the man at the edge"), (3, "")]),  # empty sentence
          _ref(2, 1, 103, "train", [(4, "nothing there")]),                # zero-area box
          _ref(3, 3, 301, "train", [(5, "corrupt image")]),
          _ref(4, 2, 201, "val", [(6, "a cat")]),
          _ref(5, 4, 401, "test", [(7, "a cup")])]
  with open(d / "refs(umd).p", "wb") as f:
    pickle.dump(refs, f, protocol=2)
  ann = lambda aid, iid, cat, bbox: {"id": aid, "image_id": iid, "category_id": cat,
                                     "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0,
                                     "segmentation": [[0, 0, 1, 1, 1, 0]]}
  (d / "instances.json").write_text(json.dumps({
      "images": [{"id": i, "width": w, "height": h, "file_name": _coco_path(d, i).name}
                 for i, (w, h) in {1: (32, 24), 2: (20, 20), 3: (9, 9), 4: (16, 12)}.items()],
      "annotations": [ann(101, 1, 1, [2, 3, 10, 8]), ann(102, 1, 2, [25, 10, 20, 30]),
                      ann(103, 1, 1, [40, 0, 5, 5]), ann(104, 1, 1, [0, 0, 4, 4]),
                      ann(301, 3, 1, [0, 0, 4, 4]), ann(201, 2, 3, [1, 1, 5, 5]),
                      ann(401, 4, 2, [0, 0, 8, 8])],
      "categories": [{"id": 1, "name": "sports ball", "supercategory": "sports"},
                     {"id": 2, "name": "person", "supercategory": "person"},
                     {"id": 3, "name": "cat", "supercategory": "animal"}]}))
  return d, pixels


def test_refcocog_builder_fields_and_log(refcocog_manual, tmp_path):
  manual, pixels = refcocog_manual
  out = builders.prepare("refcocog_regions", data_dir=str(tmp_path), manual_dir=str(manual))
  _, train = _read("refcocog_regions", str(tmp_path), "train")
  assert sorted(train) == [1]
  rec = train[1]
  np.testing.assert_array_equal(rec["image"], pixels[1])
  assert (rec["width"], rec["height"]) == (32, 24)
  assert list(rec["regions"]["id"]) == [0, 1, 2]
  assert [_text(c) for c in rec["regions"]["caption"]] == [
      "the red ball on the left", "red ball", "the man at the edge"]
  np.testing.assert_array_equal(np.stack(rec["regions"]["bbox"]),
                                [[2, 3, 12, 11], [2, 3, 12, 11], [25, 10, 32, 24]])
  assert [_text(l) for l in rec["objects"]["label"]] == ["sports ball", "person", "sports ball"]
  np.testing.assert_array_equal(np.stack(rec["objects"]["bbox"]),
                                [[2, 3, 12, 11], [25, 10, 32, 24], [0, 0, 4, 4]])
  _, val = _read("refcocog_regions", str(tmp_path), "validation")
  _, test = _read("refcocog_regions", str(tmp_path), "test")
  assert sorted(val) == [2] and [_text(c) for c in val[2]["regions"]["caption"]] == ["a cat"]
  assert sorted(test) == [4] and list(test[4]["regions"]["id"]) == [7]
  np.testing.assert_array_equal(test[4]["image"], pixels[4])
  log = builders.load_build_log(out, "train")
  assert log["counts"] == {"images_listed": 2, "skipped_images": 1, "images": 1, "regions": 3,
                           "regions_dropped_empty_sentence": 1, "regions_dropped_zero_area": 1,
                           "objects": 3, "objects_dropped_zero_area": 1}
  assert log["skipped_images"][0]["image_id"] == 3
  assert log["skipped_images"][0]["path"].endswith("COCO_train2014_000000000003.jpg")


def test_refcocog_missing_files_listed(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    builders.prepare("refcocog_regions", data_dir=str(tmp_path / "tfds"),
                     manual_dir=str(tmp_path))
  assert "['refs(umd).p', 'instances.json', 'train2014/']" in str(err.value)
  assert str(tmp_path) in str(err.value)


def test_unknown_dataset_name():
  with pytest.raises(ValueError, match="refcocog_regions"):
    builders.prepare("coco", data_dir=None, manual_dir=None)


def test_god_job_on_visual_genome(vg_manual, tmp_path):
  from aligncap_jax.data import god, god_tfds, tags

  builders.prepare("visual_genome_regions", data_dir=str(tmp_path), manual_dir=str(vg_manual[0]))
  god_tfds.build("visual_genome_regions", data_dir=str(tmp_path), top_k=1, score_threshold=0.0,
                 tag_vocab_size=5)
  source = god_tfds.load_source("visual_genome_regions", "train", str(tmp_path))
  vocab = source.vocab()
  assert vocab == tags.build_vocab(["A red ball", "sky past the edge", "whole picture"], 5)
  by_id = {r["image_id"]: r for r in source}
  rec = by_id[1]
  objects = [{"label": "ball", "bbox": [3, 2, 13, 7], "score": 1.0},
             {"label": "tree", "bbox": [30, 25, 40, 30], "score": 1.0}]
  for region in rec["regions"]:
    views = god.propose_views(region["bbox"], objects, top_k=1, image_size=(40, 30))
    np.testing.assert_array_equal(region["views"], views)
    np.testing.assert_array_equal(region["view_distance"],
                                  god.view_distances(rec["image"], region["bbox"], views))
    np.testing.assert_array_equal(region["tag_ids"], tags.tag_ids(region["caption"], vocab))
  assert len(rec["regions"][1]["views"]) == 1  # "sky" region + ball union
