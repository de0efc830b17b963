"""The engine's python tool: a calculator for arithmetic and a few string methods.

The model writes an expression between python_start and python_end; the engine calls
`calculate(expr)` and forces the returned text in between output_start and output_end.

Contract: `calculate` always returns a str, never None and never raises on model text.
  - success: the value as text, numbers formatted like GSM8K's annotations (`48/2` -> `24`, not
    `24.0`; `10/4` -> `2.5`; floats to 12 significant digits, so `0.1+0.2` -> `0.3`);
  - refusal or failure: a short line starting with "Error: " (`Error: division by zero`), so the
    model sees that its call failed and the engine keeps generating.

Safety comes from evaluating an `ast` tree ourselves, never `eval`: only number and string
literals, + - * / // % ** and unary +/-, parentheses, indexing/slicing of strings, the functions
len/abs/round/min/max, and the whitelisted methods below called on a string. Everything else
(names, attribute access, imports, dunders, comprehensions, lambdas, keywords...) is refused.
Bounds are checked *before* each operation runs: integers stay under MAX_INT_DIGITS digits
(so `9**9**9` is refused from the operands' sizes, not computed), strings under MAX_STR_CHARS
(so `'a'*10**9` is refused before allocating), the expression under MAX_EXPR_CHARS.
Time limit: with those bounds every single operation is cheap, so a deadline checked at each
node of the walk ends any long evaluation. We deliberately don't use signal.setitimer: it only
works in the main thread, and the engine runs inside server and data-loader threads.
"""

from __future__ import annotations

import ast
import math
import operator
import re
import time

MAX_EXPR_CHARS = 1_000
MAX_INT_DIGITS = 1_000
MAX_STR_CHARS = 10_000
_MAX_INT_BITS = int(MAX_INT_DIGITS * math.log2(10))

STR_METHODS = {"count", "find", "upper", "lower", "title", "capitalize", "replace", "strip",
               "lstrip", "rstrip", "startswith", "endswith", "isdigit", "isalpha"}
FUNCTIONS = {"len": len, "abs": abs, "round": round, "min": min, "max": max}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


class _Refused(Exception):
    """The expression is outside what the calculator does; the message is shown to the model."""


def calculate(expr: str, timeout_s: float = 1.0) -> str:
    """Evaluate `expr`; return its value as text or a one-line "Error: ..." (see module doc)."""
    if not isinstance(expr, str):
        raise ValueError(f"expr must be a str, got {type(expr).__name__}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    deadline = time.monotonic() + timeout_s
    if len(expr) > MAX_EXPR_CHARS:
        return f"Error: expression longer than {MAX_EXPR_CHARS} characters"
    if "'" not in expr and '"' not in expr:
        expr = _THOUSANDS.sub("", expr)  # GSM8K writes 1,000; a tuple is never what was meant
    try:
        tree = ast.parse(expr.strip(), mode="eval")
        return _format(_Evaluator(deadline).eval(tree.body))
    except _Refused as e:
        return f"Error: {e}"
    except SyntaxError:
        return "Error: not a valid expression"
    except ZeroDivisionError:
        return "Error: division by zero"
    except OverflowError:
        return "Error: number too large"
    except RecursionError:
        return "Error: expression too deeply nested"
    except (ValueError, TypeError, IndexError, MemoryError) as e:
        return f"Error: {type(e).__name__}: {str(e)[:80]}"


def _format(value) -> str:
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e16:
            return str(int(value))
        return format(value, ".12g")
    return str(value)


class _Evaluator:
    def __init__(self, deadline: float):
        self.deadline = deadline

    def eval(self, node: ast.AST):
        if time.monotonic() > self.deadline:
            raise _Refused("time limit exceeded")
        method = getattr(self, "_" + type(node).__name__, None)
        if method is None:
            raise _Refused(f"{type(node).__name__} is not supported")
        return _check_size(method(node))

    def _Constant(self, node: ast.Constant):
        if isinstance(node.value, (int, float, str)) and not isinstance(node.value, bool):
            return node.value
        raise _Refused(f"literal {node.value!r} is not supported")

    def _UnaryOp(self, node: ast.UnaryOp):
        value = _number(self.eval(node.operand))
        if isinstance(node.op, ast.USub):
            return -value
        if isinstance(node.op, ast.UAdd):
            return +value
        raise _Refused(f"operator {type(node.op).__name__} is not supported")

    def _BinOp(self, node: ast.BinOp):
        op = type(node.op)
        if op not in _BINARY:
            raise _Refused(f"operator {op.__name__} is not supported")
        left, right = self.eval(node.left), self.eval(node.right)
        _check_binary(op, left, right)
        return _BINARY[op](left, right)

    def _Call(self, node: ast.Call):
        if node.keywords:
            raise _Refused("keyword arguments are not supported")
        args = [self.eval(a) for a in node.args]
        if isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
            return _call_function(node.func.id, args)
        if isinstance(node.func, ast.Attribute) and node.func.attr in STR_METHODS:
            target = self.eval(node.func.value)
            if not isinstance(target, str):
                raise _Refused(f".{node.func.attr}() is only allowed on strings")
            if node.func.attr == "replace":
                _check_replace(target, args)
            return getattr(target, node.func.attr)(*args)
        raise _Refused("only len/abs/round/min/max and string methods can be called")

    def _Subscript(self, node: ast.Subscript):
        target = self.eval(node.value)
        if not isinstance(target, str):
            raise _Refused("only strings can be indexed")
        if isinstance(node.slice, ast.Slice):
            parts = [None if p is None else _integer(self.eval(p))
                     for p in (node.slice.lower, node.slice.upper, node.slice.step)]
            return target[slice(*parts)]
        return target[_integer(self.eval(node.slice))]

    def _Name(self, node: ast.Name):
        raise _Refused(f"names are not allowed ({node.id!r}); write the numbers themselves")

    def _Attribute(self, node: ast.Attribute):
        raise _Refused(f"attribute access is not allowed (.{node.attr}); "
                       "only calls of string methods are")


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Refused(f"expected a number, got {type(value).__name__}")
    return value


def _integer(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Refused(f"expected an integer, got {type(value).__name__}")
    return value


def _check_binary(op: type, left, right) -> None:
    """Refuse operations whose result would exceed the bounds, before computing them."""
    if isinstance(left, str) or isinstance(right, str):
        if op is ast.Add and isinstance(left, str) and isinstance(right, str):
            length = len(left) + len(right)
        elif op is ast.Mult and {type(left), type(right)} == {str, int}:
            text, times = (left, right) if isinstance(left, str) else (right, left)
            length = len(text) * max(times, 0)
        else:
            raise _Refused(f"{op.__name__} is not supported between "
                           f"{type(left).__name__} and {type(right).__name__}")
        if length > MAX_STR_CHARS:
            raise _Refused(f"string result longer than {MAX_STR_CHARS} characters")
        return
    _number(left), _number(right)
    if op is ast.Mult and isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() > _MAX_INT_BITS + 1:
            raise _Refused(f"integer result longer than {MAX_INT_DIGITS} digits")
    if op is ast.Pow and isinstance(left, int) and isinstance(right, int) and right > 0:
        if abs(left) > 1 and right * math.log2(abs(left)) > _MAX_INT_BITS:
            raise _Refused(f"integer result longer than {MAX_INT_DIGITS} digits")


def _check_replace(text: str, args: list) -> None:
    if len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        count = text.count(args[0])  # "" matches len(text) + 1 times, which is also right
        if len(args) >= 3 and isinstance(args[2], int) and args[2] >= 0:
            count = min(count, args[2])
        if len(text) + count * (len(args[1]) - len(args[0])) > MAX_STR_CHARS:
            raise _Refused(f"string result longer than {MAX_STR_CHARS} characters")


def _call_function(name: str, args: list):
    if name == "len":
        if len(args) != 1 or not isinstance(args[0], str):
            raise _Refused("len() takes one string")
        return len(args[0])
    if name == "round" and len(args) == 2 and abs(_integer(args[1])) > 100:
        raise _Refused("round() takes at most 100 digits")  # round(5, -10**9) builds 10**10**9
    if not args:
        raise _Refused(f"{name}() needs arguments")
    return FUNCTIONS[name](*[_number(a) for a in args])


def _check_size(value):
    """Every intermediate value stays small, so every single operation stays cheap."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        if value.bit_length() > _MAX_INT_BITS:
            raise _Refused(f"integer result longer than {MAX_INT_DIGITS} digits")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise _Refused("number too large")
    elif isinstance(value, str):
        if len(value) > MAX_STR_CHARS:
            raise _Refused(f"string result longer than {MAX_STR_CHARS} characters")
    else:
        raise _Refused(f"{type(value).__name__} results are not supported")
    return value
