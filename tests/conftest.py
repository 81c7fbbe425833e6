"""Fixtures shared by every test directory."""

import pytest

from miniature_runs import build_mini


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """The tiny miniature (tests/miniature_runs.py): data, a fresh actor and a fresh reward model."""
    root = tmp_path_factory.mktemp("mini")
    build_mini(root)
    return root
