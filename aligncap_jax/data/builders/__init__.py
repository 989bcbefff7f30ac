"""TFDS builders of the real region datasets and of the GOD datasets.

`prepare("visual_genome_regions" | "refcocog_regions", data_dir=..., manual_dir=...)`
builds a real dataset once from the files the user downloaded (array_record).
"""
from __future__ import annotations

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


def prepare(name: str, *, data_dir: str | None, manual_dir: str | None,
            strict: bool = False) -> str:
  """Builds a real region dataset from its manual files (reused when built).

  Args:
    name: "visual_genome_regions" or "refcocog_regions".
    data_dir: TFDS data_dir (None: TFDS default).
    manual_dir: folder with the downloaded files (see the builder's
      MANUAL_DOWNLOAD_INSTRUCTIONS).
    strict: raise on a corrupt or missing image instead of skipping and counting it.

  Returns:
    The dataset folder (`data_dir/<name>/<version>`).

  Raises:
    ValueError: unknown name (lists the known ones).
    FileNotFoundError: lists every missing manual file and where it was looked for.
  """
  if name not in REAL_BUILDERS:
    raise ValueError(f"unknown real dataset {name!r}; known: {sorted(REAL_BUILDERS)}")
  cls, required, instructions = REAL_BUILDERS[name]
  builder = cls(strict=strict, data_dir=data_dir, file_format="array_record")
  if builder.is_prepared():
    return builder.data_dir
  regions.check_manual_files(name, manual_dir, required, instructions)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.path.abspath(manual_dir)))
  return builder.data_dir


__all__ = ["GodBuilder", "GodParams", "RefcocogRegions", "VisualGenomeRegions",
           "god_builder_class", "load_build_log", "prepare", "REAL_BUILDERS"]
