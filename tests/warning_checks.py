"""Checks of the warnings sparsectx gives, apart from one warning of the Triton interpreter itself.

The interpreters of Triton 3.4-3.6 read a kernel loop's runtime bound with ``int()`` of a one-element numpy array,
which numpy 1.25-2.3 answers with a DeprecationWarning from ``triton.runtime.interpreter`` (Triton 3.8 and 3.9 do
not). A test that turns every warning into an error checks sparsectx's warnings: that one warning of the interpreter
is no warning of sparsectx's and is ignored there, nothing else.
"""
import contextlib
import warnings

INTERPRETER_NUMPY_MESSAGE = "Conversion of an array with ndim > 0 to a scalar is deprecated"


@contextlib.contextmanager
def warnings_as_errors():
    """Inside, every warning raises, but the interpreter's numpy warning (module docstring), which is ignored."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=INTERPRETER_NUMPY_MESSAGE, category=DeprecationWarning,
                                module=r"triton\.runtime\.interpreter")
        yield
