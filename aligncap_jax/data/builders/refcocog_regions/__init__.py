"""`refcocog_regions` TFDS builder (RefCOCOg umd, manual download)."""
from aligncap_jax.data.builders.refcocog_regions.refcocog_regions import RefcocogRegions
