"""``warn``: ``warnings.warn`` at the user's line, wherever sparsectx notices the problem.

A fixed ``stacklevel`` is right for one call path only: the same check runs from ``enable``, from a ``with
sparse_context(...)`` exit (through contextlib), from a patched forward (through torch's ``Module.__call__``) or
during backward (through autograd). The warning is attributed to the first frame outside sparsectx and the
libraries it runs inside, so the message shows the user's line and ``filterwarnings(module=...)`` sees the user's
module.
"""
from __future__ import annotations

import sys
import warnings

# modules whose frames are never the user's line: sparsectx itself and what calls into it on the user's behalf
_LIBRARY_PREFIXES = ("sparsectx", "torch", "diffusers", "accelerate", "peft", "transformers", "triton",
                     "contextlib", "functools", "importlib", "threading")


def _is_library(frame) -> bool:
    name = frame.f_globals.get("__name__") or ""
    return any(name == prefix or name.startswith(prefix + ".") for prefix in _LIBRARY_PREFIXES)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the innermost caller outside the libraries above."""
    frame, level = sys._getframe(1), 2  # (level 2: this function's caller)
    while frame is not None and _is_library(frame):
        frame = frame.f_back
        # warnings.warn does not count importlib's bootstrap frames (a warning given while a module is imported)
        if frame is not None and not _is_import_machinery(frame):
            level += 1
    warnings.warn(message, category, stacklevel=level)


def _is_import_machinery(frame) -> bool:
    """A frame of importlib's bootstrap, which ``warnings`` skips when it applies ``stacklevel`` (as CPython's
    ``warnings._is_internal_frame`` tells them)."""
    filename = frame.f_code.co_filename
    return "importlib" in filename and "_bootstrap" in filename
