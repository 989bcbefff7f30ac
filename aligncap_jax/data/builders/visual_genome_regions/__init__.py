"""`visual_genome_regions` TFDS builder (Visual Genome v1.2, manual download)."""
from aligncap_jax.data.builders.visual_genome_regions.visual_genome_regions import VisualGenomeRegions
