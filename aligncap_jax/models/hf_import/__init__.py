"""aligncap_jax."""
