"""Schedule values: endpoints, monotonicity and the Zhu & Gupta formula."""

import pytest

from masksparse._errors import MaskSparseError
from masksparse.schedule.curves import constant, cubic, linear


@pytest.mark.parametrize("fn", [cubic, linear])
def test_endpoints_and_monotone(fn):
    values = [fn(t, 0.9, 10, 110) for t in range(130)]
    assert values[0] == 0.0 and values[10] == 0.0
    assert values[110] == pytest.approx(0.9) and values[-1] == pytest.approx(0.9)
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_cubic_formula():
    assert cubic(35, 0.9, 10, 110) == pytest.approx(0.9 - 0.9 * 0.75**3)
    assert linear(35, 0.9, 10, 110) == pytest.approx(0.225)
    assert constant(9, 0.9, 10, 110) == 0.0 and constant(10, 0.9, 10, 110) == 0.9


@pytest.mark.parametrize("args", [(1.0, 0, 10), (-0.1, 0, 10), (0.5, 10, 0)])
def test_invalid_raise(args):
    with pytest.raises(MaskSparseError):
        cubic(0, *args)
