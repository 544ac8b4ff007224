"""The examples in the public docstrings run and print what they claim."""

import doctest

import glakernels._api


def test_public_docstring_example_runs():
    result = doctest.testmod(glakernels._api, verbose=False)
    assert result.attempted > 0 and result.failed == 0
