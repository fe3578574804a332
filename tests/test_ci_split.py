"""CI's two parts share the suite (tests/_ci_split.py): every test runs in one of them at least."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests._ci_split import CUDA_PART_ONLY, MAIN_PART_ONLY, left_out

ROOT = Path(__file__).resolve().parent.parent
TEST_FILES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("test_*.py"))


def test_the_split_names_existing_test_files():
    for path in CUDA_PART_ONLY + MAIN_PART_ONLY:
        assert path in TEST_FILES, path


@pytest.mark.parametrize("markers", [set(), {"dynamo"}, {"dynamo", "slow"}])
def test_every_test_runs_in_some_part(markers):
    missed = [p for p in TEST_FILES if left_out("main", p, markers) and left_out("cuda", p, markers)]
    assert not missed
    # and each part has a share of its own
    assert any(left_out("main", p, set()) for p in TEST_FILES)
    assert any(left_out("cuda", p, set()) for p in TEST_FILES)


def test_an_unknown_part_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid: main, cuda"):
        left_out("gpu", "tests/test_cli.py", set())
