"""The calculator tool: evaluates arithmetic (and str.count) expressions without ever calling eval.

The expression is parsed with `ast` and walked by hand; only numbers, + - * / // % **, unary signs, parentheses and
`'literal'.count('x')` are allowed. Size limits bound the work instead of a timer: exponents and operand magnitudes
are capped so that no expression can run long or allocate much.

Every number, literal or computed, must be finite with |x| <= MAX_ABS: a result the model would read back as
`inf`, `nan` or a 300-digit integer is refused (CalculatorError) rather than fed into the conversation.
"""

from __future__ import annotations

import ast
import math
import operator
import re

MAX_EXPR_CHARS = 200
MAX_ABS = 10**18  # the largest magnitude of any literal, intermediate or final result
MAX_EXPONENT = 64
_SHOWN_DIGITS = 24  # longer numbers are abbreviated in error messages

_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    """The expression is not allowed or cannot be evaluated."""


def _in_range(value: int | float | complex | str) -> int | float | str:
    """`value` unless it is a number that is complex, not finite, or larger in magnitude than MAX_ABS."""
    if isinstance(value, str):
        return value
    if isinstance(value, complex):
        raise CalculatorError(f"number {value} is complex; only real numbers are allowed")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError(f"number {value} is not finite")
    if abs(value) > MAX_ABS:
        text = str(value)
        shown = text if len(text) <= _SHOWN_DIGITS else f"{text[:_SHOWN_DIGITS]}... ({len(text)} characters)"
        raise CalculatorError(f"number {shown} is out of range: |x| must be <= {MAX_ABS}")
    return value


def _eval(node: ast.AST) -> int | float | str:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    value = getattr(node, "value", None)
    if isinstance(node, ast.Constant) and isinstance(value, int | float | str) and not isinstance(value, bool):
        return _in_range(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        v = _eval(node.operand)
        if isinstance(v, str):
            raise CalculatorError("unary operator on a string")
        return _UNARY[type(node.op)](v)  # operand already in range, negation keeps it there
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _eval(node.left), _eval(node.right)
        if isinstance(a, str) or isinstance(b, str):
            raise CalculatorError("arithmetic on strings is not allowed")
        if isinstance(node.op, ast.Pow) and abs(b) > MAX_EXPONENT:
            raise CalculatorError(f"exponent {b} exceeds {MAX_EXPONENT}")
        try:
            out = _BINOPS[type(node.op)](a, b)
        except (ZeroDivisionError, OverflowError) as exc:
            raise CalculatorError(str(exc)) from exc
        return _in_range(out)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "count"
        and isinstance(node.func.value, ast.Constant)
        and isinstance(node.func.value.value, str)
        and len(node.args) == 1
        and not node.keywords
    ):
        arg = _eval(node.args[0])
        if not isinstance(arg, str):
            raise CalculatorError("count() takes a string")
        return node.func.value.value.count(arg)
    raise CalculatorError(f"{type(node).__name__} is not allowed in a calculator expression")


def calculate(expr: str) -> str:
    """Evaluate `expr` and return the result as text; raises CalculatorError for anything not allowed."""
    expr = re.sub(r"(?<=\d),(?=\d{3}\b)", "", expr.strip())  # thousands separators: 1,234 -> 1234
    if not expr:
        raise CalculatorError("empty expression")
    if len(expr) > MAX_EXPR_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPR_CHARS} characters")
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"not an expression: {expr!r}") from exc
    value = _eval(tree)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, float):
        value = round(value, 6)
    return str(value)
