"""Triton kernels of sparsectx (installed as ``sparsectx.kernels``; Triton only, no model knowledge).

Each module holds kernels and their launchers; the plain-torch specification of what each computes lives in
``sparsectx/reference.py`` and the public, validated entry points in ``sparsectx/ops.py``.

- ``attention``: gather-based sparse joint attention, varlen forward and backward; the attention mass each key
  receives (token-selection probes).
- ``compaction``: top-k / keep-mask token compaction with fused row gather, and the inverse scatter.
- ``norm_rope``: the QK RMS norm, text/image join and rotary embedding of FLUX and Qwen-Image attention in one
  pass, forward and backward.
"""
if __name__ != "sparsectx.kernels":
    # Found as a top-level `kernels` because a source checkout's root is on sys.path (`python -c ...` run there).
    # That name belongs to Hugging Face's `kernels` package, which transformers and diffusers probe for. Look
    # like an empty namespace package (no __file__, nothing exported): their probes then report it as absent.
    del __file__
