"""Data: the synthetic dataset, tokenizers, transforms and the grain pipeline."""
from aligncap_jax.data.pipeline import Assets
from aligncap_jax.data.pipeline import build_prompt
from aligncap_jax.data.pipeline import eval_targets
from aligncap_jax.data.pipeline import load_assets
from aligncap_jax.data.pipeline import make_assets
from aligncap_jax.data.pipeline import make_eval_iterator
from aligncap_jax.data.pipeline import make_predict_batch
from aligncap_jax.data.pipeline import make_train_iterator
from aligncap_jax.data.pipeline import prepare
from aligncap_jax.data.pipeline import train_prompt
from aligncap_jax.data.synthetic import SyntheticRegions
from aligncap_jax.data.synthetic_hard import SyntheticRegionsHard
