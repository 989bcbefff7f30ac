"""Command-line tools: `python -m aligncap_jax.tools.hf_parity` (HF import and decoding parity)."""
