"""TFDS builders of the GOD datasets (`<base>_god`)."""
from aligncap_jax.data.builders.god.god_builder import GodBuilder
from aligncap_jax.data.builders.god.god_builder import GodParams
from aligncap_jax.data.builders.god.god_builder import RefcocogRegionsGod
from aligncap_jax.data.builders.god.god_builder import SyntheticRegionsGod
from aligncap_jax.data.builders.god.god_builder import VisualGenomeRegionsGod
from aligncap_jax.data.builders.god.god_builder import annotate_record
from aligncap_jax.data.builders.god.god_builder import god_builder_class
from aligncap_jax.data.builders.god.god_builder import read_detections
