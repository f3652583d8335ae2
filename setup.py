"""sparsectx: Triton kernels for Sparse Context in reference-conditioned diffusion transformers.

The Triton kernels live in the top-level ``kernels/`` folder but are installed as ``sparsectx.kernels``
only: Hugging Face's ``kernels`` package owns the top-level name ``kernels`` and diffusers probes for it.
"""
from setuptools import setup

setup(
    name="sparsectx",
    version="0.1.0",
    description="Gather-based sparse reference attention and token compaction kernels for DiT editing models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["sparsectx", "sparsectx.kernels"],
    package_dir={"sparsectx": "sparsectx", "sparsectx.kernels": "kernels"},
    install_requires=[
        # no upper pin and no CUDA-only pin: a machine that already has torch keeps it. Triton 3.4 is the oldest
        # release whose interpreter runs the test suite and that compiles every kernel for sm_90 (3.2/3.3 cannot
        # even import the autotuned kernels without a GPU driver); torch 2.8 is the first release that ships it
        "torch>=2.8",
        "triton>=3.4; platform_system == 'Linux'",
        # 0.39: the oldest release the whole suite passes with (0.38 passes Qwen-Image's text mask to the
        # processors in another form; 0.37 has no FLUX.2 klein KV cache; 0.35 no FLUX.2 / Qwen-Image-Edit-Plus)
        "diffusers>=0.39",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis", "transformers", "peft", "accelerate",
                 "matplotlib", "cloudpickle"],
        "train": ["peft", "accelerate"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["sparsectx=sparsectx.cli:console"]},
)
