"""Triton kernels of sparsectx (installed as ``sparsectx.kernels``; Triton only, no model knowledge).

Each module holds kernels and their launchers; the plain-torch specification of what each computes lives in
``sparsectx/reference.py`` and the public, validated entry points in ``sparsectx/ops.py``.

- ``attention``: gather-based sparse joint attention, varlen forward and backward.
- ``compaction``: top-k / keep-mask token compaction with fused row gather, and the inverse scatter.
"""
if __name__ != "sparsectx.kernels":  # pragma: no cover - guards the import name
    raise ImportError(
        "sparsectx's Triton kernels must be imported as `sparsectx.kernels`, not as a top-level `kernels` "
        "(that name belongs to Hugging Face's `kernels` package)"
    )
