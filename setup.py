"""aligncap_jax: AlignCap (region-level captioning, arXiv 2412.10348) in JAX/Flax."""
import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _pinned():
  lines = (_HERE / "requirements.lock").read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.startswith("#")]


setuptools.setup(
    name="aligncap_jax",
    version="0.1.0",
    description="AlignCap region captioning in JAX/Flax (CPU, GPU, TPU).",
    long_description=(_HERE / "README.md").read_text() if (_HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["aligncap_jax", "aligncap_jax.*"]),
    package_data={"aligncap_jax": ["data/**/*.txt", "data/**/*.md", "serve/*.html"]},
    python_requires=">=3.11",
    install_requires=_pinned(),
    extras_require={
        # Parity tests against the PyTorch reference (CPU wheel; never torchvision).
        # The browser test drives Debian's chromium (never a downloaded browser).
        "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "torch==2.13.0", "playwright==1.65.2"],
        # The TPU compiler, for `--mode aot --aot_topology v5e:2x4` without a TPU.
        "tpu": ["jax[tpu]==0.10.2"],
        # TFDS's Beam path for dataset builds past one machine (own venv: pins older protobuf).
        "beam": ["apache-beam==2.77.0"],
        "hub": ["huggingface-hub"],
    },
)
