"""TFDS builders of the real region datasets and of the GOD datasets.

`prepare("visual_genome_regions" | "refcocog_regions", data_dir=..., manual_dir=...)`
builds a real dataset once from the files the user downloaded (array_record).
"""
from __future__ import annotations

import hashlib
import json
import os

import tensorflow_datasets as tfds

from aligncap_jax.data.builders import regions
from aligncap_jax.data.builders.god import GodBuilder
from aligncap_jax.data.builders.god import GodParams
from aligncap_jax.data.builders.god import god_builder_class
from aligncap_jax.data.builders.refcocog_regions import RefcocogRegions
from aligncap_jax.data.builders.refcocog_regions import refcocog_regions as _refcocog
from aligncap_jax.data.builders.regions import load_build_log
from aligncap_jax.data.builders.visual_genome_regions import VisualGenomeRegions
from aligncap_jax.data.builders.visual_genome_regions import visual_genome_regions as _vg

REAL_BUILDERS = {
    "visual_genome_regions": (VisualGenomeRegions, _vg.REQUIRED, _vg.INSTRUCTIONS),
    "refcocog_regions": (RefcocogRegions, _refcocog.REQUIRED, _refcocog.INSTRUCTIONS),
}


SPLITS_SOURCE_FILE = "splits_source.json"


def _splits_source(split_file: str | None) -> dict:
  if split_file is None:
    return {"split_file": None, "sha256": None}
  with open(split_file, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  return {"split_file": os.path.abspath(split_file), "sha256": digest}


def prepare(name: str, *, data_dir: str | None, manual_dir: str | None,
            strict: bool = False, split_file: str | None = None) -> str:
  """Builds a real region dataset from its manual files (reused when built).

  Args:
    name: "visual_genome_regions" or "refcocog_regions".
    data_dir: TFDS data_dir (None: TFDS default).
    manual_dir: folder with the downloaded files (see the builder's
      MANUAL_DOWNLOAD_INSTRUCTIONS).
    strict: raise on a corrupt or missing image instead of skipping and counting it.
    split_file: VG only: the splits (see `visual_genome_regions.read_split_file`)
      instead of the manual dir's densecap_splits.json. A dataset already built
      from other splits is an error (its folder is named), never reused.

  Returns:
    The dataset folder (`data_dir/<name>/<version>`).

  Raises:
    ValueError: unknown name (lists the known ones).
    FileNotFoundError: lists every missing manual file and where it was looked for.
  """
  if name not in REAL_BUILDERS:
    raise ValueError(f"unknown real dataset {name!r}; known: {sorted(REAL_BUILDERS)}")
  cls, required, instructions = REAL_BUILDERS[name]
  kwargs = {}
  if split_file is not None:
    if name != "visual_genome_regions":
      raise ValueError(f"data.split_file applies to visual_genome_regions only, not {name}")
    if not os.path.isfile(split_file):
      raise FileNotFoundError(f"data.split_file {split_file}: file not found")
    kwargs["split_file"] = split_file
  builder = cls(strict=strict, data_dir=data_dir, file_format="array_record", **kwargs)
  source = _splits_source(split_file)
  marker = os.path.join(builder.data_dir, SPLITS_SOURCE_FILE)
  if builder.is_prepared():
    built = {"split_file": None, "sha256": None}
    if os.path.isfile(marker):
      with open(marker) as f:
        built = json.load(f)
    if built["sha256"] != source["sha256"]:
      raise ValueError(f"{name} in {builder.data_dir} was built with splits from "
                       f"{built['split_file'] or 'densecap_splits.json'}, not "
                       f"{source['split_file'] or 'densecap_splits.json'}; use another "
                       "data.data_dir (or delete that folder) to build it with these splits")
    return builder.data_dir
  regions.check_manual_files(name, manual_dir, required, instructions)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.path.abspath(manual_dir)))
  with open(marker, "w") as f:
    json.dump(source, f, indent=1)
  return builder.data_dir


__all__ = ["GodBuilder", "GodParams", "RefcocogRegions", "VisualGenomeRegions",
           "god_builder_class", "load_build_log", "prepare", "REAL_BUILDERS"]
