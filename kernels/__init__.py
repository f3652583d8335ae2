"""Triton kernels of sparsectx (installed as ``sparsectx.kernels``; Triton only, no model knowledge).

Each module holds kernels and their launchers; the plain-torch specification of what each computes lives in
``sparsectx/reference.py`` and the public, validated entry points in ``sparsectx/ops.py``.

- ``attention``: gather-based sparse joint attention, varlen forward and backward; the attention mass each key
  receives (token-selection probes).
- ``compaction``: top-k / keep-mask token compaction with fused row gather, and the inverse scatter; the
  selection budgets' keep mask from a ranking (fixed or adaptive counts).
- ``norm_rope``: the QK RMS norm, text/image join and rotary embedding of FLUX and Qwen-Image attention in one
  pass, forward and backward.
"""
if __name__ != "sparsectx.kernels":
    # Found as a top-level `kernels` because a source checkout's root is on sys.path (`python -c ...` run there).
    # That name belongs to Hugging Face's `kernels` package, which transformers and diffusers probe for and import.
    # If it is installed, it is loaded here and stands in sys.modules under its name (what the import returns);
    # else this folder looks like an empty namespace package (no __file__, nothing exported): probes report it
    # as absent.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        __name__, [entry for entry in _sys.path if _os.path.abspath(entry or _os.curdir) != _checkout])
    if _spec is not None and __name__ == "kernels":
        _module = _util.module_from_spec(_spec)
        _sys.modules[__name__] = _module
        _spec.loader.exec_module(_module)
    else:
        del __file__
