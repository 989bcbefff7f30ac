"""Hugging Face style export of a trained AlignCap, and its re-import."""
from aligncap_jax.hf_export.folder import abstract_params
from aligncap_jax.hf_export.folder import export
from aligncap_jax.hf_export.folder import export_dir
from aligncap_jax.hf_export.folder import load
from aligncap_jax.hf_export.folder import load_assets
from aligncap_jax.hf_export.folder import load_params
from aligncap_jax.hf_export.folder import push
from aligncap_jax.hf_export.folder import read_config
from aligncap_jax.hf_export.folder import write_folder
from aligncap_jax.hf_export.safetensors_io import save_params
