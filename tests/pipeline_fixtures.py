"""Fixtures shared by the tests of whole pipeline calls (tests/test_longcat.py, tests/test_fibo.py)."""
import pytest

import sparsectx


def tiny_pipeline_fixtures(make):
    """``(pipe, always_disabled)``: a module-scoped fixture ``pipe`` holding ``make()``, disabled after the module,
    and an autouse fixture disabling it after every test. Assign both to names of the test module."""

    @pytest.fixture(scope="module")
    def pipe():
        pipeline = make()
        yield pipeline
        sparsectx.disable(pipeline)

    @pytest.fixture(autouse=True)
    def always_disabled(pipe):
        yield
        sparsectx.disable(pipe)

    return pipe, always_disabled
