"""The HTTP service (`--mode serve`): FastAPI app, cross-client batcher, page."""
from aligncap_jax.serve.app import make_app
from aligncap_jax.serve.app import serve
from aligncap_jax.serve.batcher import Batcher
from aligncap_jax.serve.batcher import QueueFull
