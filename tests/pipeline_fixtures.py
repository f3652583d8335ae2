"""Fixtures shared by the tests of tiny models and of whole pipeline calls (tests/test_longcat.py, tests/test_fibo.py,
tests/test_zimage.py, ...)."""
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


def tiny_model_fixtures(make):
    """``(model, always_disabled)``: a module-scoped fixture ``model`` holding ``make()``, and an autouse fixture
    disabling it after every test (named apart from ``tiny_pipeline_fixtures``' one: a module may use both). Assign
    both to names of the test module."""

    @pytest.fixture(scope="module")
    def model():
        return make()

    @pytest.fixture(autouse=True)
    def model_always_disabled(model):
        yield
        sparsectx.disable(model)

    return model, model_always_disabled
