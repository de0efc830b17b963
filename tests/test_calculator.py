"""The engine's calculator: right answers in GSM8K's format, refusals before any costly work."""

import threading

import pytest

from llm.generate import calculator
from llm.generate.calculator import calculate


@pytest.mark.parametrize("expr, expected", [
    ("48/2", "24"),            # GSM8K's annotations write 24, not 24.0
    ("10/4", "2.5"),
    ("3*1.5", "4.5"),
    ("0.1+0.2", "0.3"),        # 12 significant digits hide float noise
    ("10/3", "3.33333333333"),
    ("2**10", "1024"),
    ("7//2", "3"),
    ("-7 % 3", "2"),
    ("(2 + 3) * 4", "20"),
    ("-(4 - 6)", "2"),
    ("2**-1", "0.5"),
    ("1,000 * 3", "3000"),     # thousands separators as GSM8K writes them
    ("12,500 + 1,250,000", "1262500"),
    (" 5 + 5 ", "10"),
    ("round(2.567, 2)", "2.57"),
    ("max(3, 7.5) + abs(-1)", "8.5"),
    ("2**100", str(2**100)),
])
def test_arithmetic(expr, expected):
    assert calculate(expr) == expected


@pytest.mark.parametrize("expr, expected", [
    ("'strawberry'.count('r')", "3"),
    ("len('hello')", "5"),
    ("'Hello'.upper()", "HELLO"),
    ("'Hello'.lower()", "hello"),
    ("'a-b-c'.replace('-', '')", "abc"),
    ("'  pad  '.strip()", "pad"),
    ("'abcdef'[1:4]", "bcd"),
    ("'abc'[-1]", "c"),
    ("'ab' + 'cd'", "abcd"),
    ("'ab' * 3", "ababab"),
    ("'a,b'.count(',')", "1"),  # commas inside strings are left alone
    ("'banana'.startswith('ban')", "True"),
])
def test_string_methods(expr, expected):
    assert calculate(expr) == expected


@pytest.mark.parametrize("expr", [
    "__import__('os')",
    "__import__('os').system('true')",
    "().__class__",
    "''.__class__.__mro__",
    "'a'.__class__.__base__.__subclasses__()",
    "'a'.format(1)",          # a method, but not a whitelisted one
    "x + 1",
    "print(1)",
    "open('/etc/passwd')",
    "[i for i in range(3)]",
    "(lambda: 1)()",
    "f'{1+1}'",
    "'%s' % 'a'",
    "round(x=1)",
    "import os",
    "1; 2",
    "{}",
    "(1, 2)",
    "True + 1",
])
def test_refuses_everything_but_the_whitelist(expr):
    result = calculate(expr)
    assert result.startswith("Error: "), result


@pytest.mark.parametrize("expr, message", [
    ("1/0", "Error: division by zero"),
    ("9**9**9", "Error: integer result longer than 1000 digits"),
    ("10**999 * 10**999", "Error: integer result longer than 1000 digits"),
    ("'a' * 10**9", "Error: string result longer than 10000 characters"),
    ("'ab'.replace('', 'x' * 10000)", "Error: string result longer than 10000 characters"),
    ("'x' * 9999 + 'yy'", "Error: string result longer than 10000 characters"),
    ("1.5 ** 10**9", "Error: number too large"),
    ("round(5, -10**9)", "Error: round() takes at most 100 digits"),
    ("(-8) ** (1/3)", "Error: complex results are not supported"),
    ("1" * 1001, "Error: expression longer than 1000 characters"),
])
def test_bounds(expr, message):
    assert calculate(expr) == message


def test_huge_operations_are_refused_before_they_run(monkeypatch):
    """The size checks look at the operands: the costly operation is never even started."""
    calls = []

    def spy(fn):
        def wrapped(a, b):
            calls.append((fn.__name__, a, b))
            return fn(a, b)
        return wrapped

    binary = {op: spy(fn) for op, fn in calculator._BINARY.items()}
    monkeypatch.setattr(calculator, "_BINARY", binary)
    assert calculate("9**9**9").startswith("Error")
    assert calculate("'a' * 10**9").startswith("Error")
    assert ("pow", 9, 9) in calls  # the inner, harmless power ran...
    assert not any(a == 9 and b == 9**9 for _, a, b in calls)  # ...the outer one did not
    assert not any(name == "mul" and b == 10**9 for name, _, b in calls)
    assert calls and all(name in {"pow", "mul"} for name, _, _ in calls)


def test_hostile_inputs_never_hang():
    """Each hostile input returns (a liveness check, not a speed threshold)."""
    exprs = ["9**9**9", "'a'*10**9", "2**2**2**2**2", "-" * 900 + "1", "(" * 300 + "1" + ")" * 300,
             "10**1000 // 3 ** 2000", "'ab'.replace('', 'c'*5000).replace('', 'd'*5000)"]
    results = {}

    def run():
        for e in exprs:
            results[e] = calculate(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert all(r.startswith("Error: ") for r in results.values()), results


def test_time_limit_ends_evaluation():
    long_sum = "+".join(["1"] * 400)
    assert calculate(long_sum) == "400"
    # Parsing alone takes longer than a microsecond, so the deadline has passed at the first node.
    assert calculate(long_sum, timeout_s=1e-6) == "Error: time limit exceeded"


def test_works_outside_the_main_thread():
    """No signals: the engine calls the tool from server and data-loader threads."""
    out = []
    t = threading.Thread(target=lambda: out.append(calculate("6*7")))
    t.start()
    t.join()
    assert out == ["42"]


def test_programming_errors_raise():
    with pytest.raises(ValueError, match="expr must be a str"):
        calculate(42)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        calculate("1+1", timeout_s=0)

