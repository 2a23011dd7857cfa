"""Every case of the bad-input catalogue (tests/reliability/catalogue.py) as one parametrized test."""

from __future__ import annotations

import pytest

from .catalogue import CASES


def test_the_catalogue_covers_at_least_25_kinds_of_bad_input():
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case, tmp_path):
    message = case.check(tmp_path)
    assert isinstance(message, str) and message
