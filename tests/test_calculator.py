"""Calculator range limits: every number it handles or returns is finite and within MAX_ABS."""

import pytest

from recursive_model.calculator import MAX_ABS, CalculatorError, calculate


@pytest.mark.parametrize(
    "expr, why",
    [
        ("1e400", "not finite"),  # the literal itself parses to inf
        ("1e309 - 1e309", "not finite"),  # inf - inf = nan
        ("1e308", "out of range"),
        ("9" * 30, r"out of range: \|x\| must be <= " + str(MAX_ABS)),
        (f"{MAX_ABS} + 1", "out of range"),
        (f"-{MAX_ABS} - 1", "out of range"),
        (f"{MAX_ABS} * {MAX_ABS}", r"\(37 characters\)"),  # abbreviated, not printed in full
        ("(-8) ** 0.5", "complex"),
    ],
)
def test_non_finite_complex_and_oversized_numbers_are_refused(expr, why):
    with pytest.raises(CalculatorError, match=why):
        calculate(expr)


@pytest.mark.parametrize("expr", [f"{MAX_ABS}", f"-{MAX_ABS}", f"{MAX_ABS} - 1 + 1", f"{MAX_ABS // 2} * 2"])
def test_the_bounds_themselves_are_allowed(expr):
    assert int(calculate(expr)) == eval(expr)  # eval is safe here: the expressions are this test's own literals
