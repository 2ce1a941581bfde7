"""What one expression or template may compute: the bounds and the bounded operations.

A condition or template is evaluated on the event loop, so an expression that allocates
a gigabyte or loops for minutes stalls every source, the API and ``/healthz``. Each
operation that can grow a value beyond its inputs checks the size of its result
*before* allocating it, and the Jinja fallback counts its loop iterations per render:

==================  ==========  ===============================================
bound               value       what it caps
==================  ==========  ===============================================
``MAX_INT_BITS``    4096        an integer made by ``**`` or ``*`` (``<<`` is not
                                part of the language on either path)
``MAX_STRING``      4 MiB       a string made by ``*``, ``+``, ``~``, ``%``, a
                                method or a filter (in characters); above the
                                1 MB a Kafka record may have, so the bus's own
                                limit stays the one a payload meets
``MAX_ITEMS``       100,000     a list or tuple made by ``*`` or ``+``
``MAX_OUTPUT``      4 MiB       what one template renders, and the text a value
                                would become (``str()``, output, ``tojson``)
``MAX_LOOP``        100,000     loop iterations, ``range()`` items, calls, filter
                                input items (16 per unit) and KiB built by ``~``,
                                ``+``, ``*`` in one Jinja render, nested loops
                                counted together
``MAX_ROUND_DIGITS`` 1365       negative digits of ``round()`` on an integer
==================  ==========  ===============================================

An operation past a bound raises ``ConditionError`` naming the bound (``expression
exceeds the string bound of 4194304 characters``); the caller turns it into an
``error`` decision or a failed task, and the next event is decided as usual. At load
time the compilers fold constant subexpressions with the same operations, so
``9 ** (9 ** 9)`` or ``'a' * 10 ** 9`` is a ``ValueError`` from ``loopd check``.

The per-render loop budget is a ``Budget`` held in a context variable that each Jinja
render sets and resets; there is no module-level mutable state.
"""

from __future__ import annotations

import contextvars
import itertools
import math
import operator
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from loopd.errors import ConditionError

MAX_INT_BITS = 4096
MAX_STRING = 1 << 22
MAX_ITEMS = 100_000
MAX_OUTPUT = 1 << 22
MAX_LOOP = 100_000

_SEQUENCES = (str, bytes, list, tuple)
# round(5, -10 ** 7) computes 10 ** 10 ** 7: more digits than this are refused
MAX_ROUND_DIGITS = MAX_INT_BITS // 3


def _too_big(what: str, limit: int, unit: str) -> ConditionError:
    return ConditionError(f"expression exceeds the {what} bound of {limit} {unit}")


def check_int(value: int) -> int:
    if value.bit_length() > MAX_INT_BITS:
        raise _too_big("integer", MAX_INT_BITS, "bits")
    return value


def check_length(value: Any, extra: int = 0) -> None:
    """Refuse a str/bytes/list/tuple of ``len(value) + extra`` items past its bound."""
    size = len(value) + extra
    if isinstance(value, str | bytes):
        if size > MAX_STRING:
            raise _too_big("string", MAX_STRING, "characters")
    elif size > MAX_ITEMS:
        raise _too_big("list", MAX_ITEMS, "items")


# The numeric cases come first and test type() with ``is``: these run on every event, a
# call of mul(95, 2) costs about 150 ns where isinstance chains cost 450.

def power(base: Any, exp: Any) -> Any:
    if type(base) is float or type(exp) is float:
        return base ** exp  # a float overflows with OverflowError, at once
    if type(base) in (int, bool) and type(exp) in (int, bool) and exp > 0 and abs(base) > 1 \
            and (exp > MAX_INT_BITS or exp * math.log2(abs(base)) > MAX_INT_BITS):
        raise _too_big("integer", MAX_INT_BITS, "bits")
    return base ** exp


def mul(left: Any, right: Any) -> Any:
    kind_left, kind_right = type(left), type(right)
    if kind_left is float or kind_right is float:
        return left * right  # a float times a sequence is a TypeError
    if kind_left is int and kind_right is int:
        if left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
            raise _too_big("integer", MAX_INT_BITS, "bits")
        return left * right
    if isinstance(left, _SEQUENCES) and isinstance(right, int):
        if right > 0:
            check_length(left, len(left) * (right - 1))
    elif isinstance(right, _SEQUENCES) and isinstance(left, int):
        if left > 0:
            check_length(right, len(right) * (left - 1))
    elif isinstance(left, int) and isinstance(right, int) and \
            left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
        raise _too_big("integer", MAX_INT_BITS, "bits")
    return left * right


def add(left: Any, right: Any) -> Any:
    kind = type(left)
    if kind is int or kind is float:
        return left + right
    if isinstance(left, _SEQUENCES) and kind is type(right):
        check_length(left, len(right))
    return left + right


# a printf conversion: widths and precisions are checked, `*` widths refused
PRINTF = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d*)(?:\.(\*|\d*))?[hlL]?[a-zA-Z%]")


def mod(left: Any, right: Any) -> Any:
    if type(left) is not str:
        return left % right
    extra = 0
    for m in PRINTF.finditer(left):
        for size in m.groups():
            if size == "*":
                raise ConditionError("expression uses a '*' width in % formatting")
            if size:
                extra += int(size) if len(size) < 10 else MAX_STRING + 1
    args = right if isinstance(right, tuple) else (right,)
    for arg in args:
        extra += text_size(arg, MAX_STRING) if not isinstance(arg, str) else len(arg)
    check_length(left, extra)
    return left % right


def concat(*parts: Any) -> str:
    """Jinja's ``~``: every part as text, the whole within MAX_STRING."""
    size = 0
    for part in parts:
        size += len(part) if isinstance(part, str) else text_size(part, MAX_STRING)
        if size > MAX_STRING:
            raise _too_big("string", MAX_STRING, "characters")
    charge_size(size)
    return "".join(str(p) for p in parts)


BINOPS: dict[str, Callable[[Any, Any], Any]] = {
    "**": power, "*": mul, "+": add, "%": mod,
    "-": operator.sub, "/": operator.truediv, "//": operator.floordiv,
}


def text_size(value: Any, limit: int = MAX_OUTPUT) -> int:
    """About how many characters ``str(value)`` has; raises once past ``limit``.

    Stops walking at the limit, so a list holding one big string 100,000 times costs
    at most ``limit`` steps to refuse, not the gigabytes its text would take.
    """
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, dict):
            total += 2 + 4 * len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            total += 2 + 2 * len(item)
            stack.extend(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            total += item.bit_length() // 3 + 2
        else:
            total += 24
        if total > limit:
            raise _too_big("output", limit, "characters")
    return total


SCALARS = frozenset({str, int, float, bool, type(None)})


def bounded_str(value: Any = "") -> str:
    """``str()`` that refuses to turn a structure into more than MAX_OUTPUT characters."""
    if type(value) not in SCALARS:
        text_size(value)
    return str(value)


def bounded_sum(items: Iterable[Any], start: Any = 0) -> Any:
    """``sum()`` that joins lists in one step within MAX_ITEMS (the builtin copies the
    growing list once per item: quadratic); numbers are summed as usual."""
    if not isinstance(start, list | tuple):
        return sum(items, start)
    parts = list(items)
    for part in parts:
        if type(part) is not type(start):
            raise TypeError(f"can only concatenate {type(start).__name__} "
                            f"(not {type(part).__name__})")
    check_length(start, sum(len(p) for p in parts))
    return type(start)(itertools.chain(start, *parts))


def check_round(number: Any, ndigits: Any) -> None:
    if isinstance(number, int) and isinstance(ndigits, int) and ndigits < -MAX_ROUND_DIGITS:
        raise _too_big("rounding", MAX_ROUND_DIGITS, "digits")


def bounded_round(number: Any, ndigits: Any = None) -> Any:
    """``round()``, refusing ``round(5, -10 ** 7)`` (it would compute 10 ** 10 ** 7)."""
    check_round(number, ndigits)
    return round(number, ndigits)


def _width(value: Any) -> Any:
    if isinstance(value, int) and value > MAX_STRING:
        raise _too_big("string", MAX_STRING, "characters")
    return value


def _check_replace(text: str, old: str, new: str, count: int = -1) -> None:
    if len(new) > len(old):
        found = len(text) + 1 if old == "" else text.count(old)
        if 0 <= count < found:
            found = count
        check_length(text, found * (len(new) - len(old)))


def _check_join(sep: str, items: Iterable[Any]) -> None:
    if not isinstance(items, list | tuple | str):
        return  # a lazy iterable: its items exist already or were charged to the budget
    size = len(sep) * max(len(items) - 1, 0)
    for part in items:
        size += len(part) if isinstance(part, str) else text_size(part, MAX_STRING)
        if size > MAX_STRING:
            raise _too_big("string", MAX_STRING, "characters")


def _check_expandtabs(text: str, tabsize: int = 8) -> None:
    check_length(text, text.count("\t") * max(tabsize, 0))


def _check_pad(text: str, width: int, *fill: str) -> None:
    _width(width)


def _check_format(text: str, *args: Any, **kwargs: Any) -> None:
    for spec in re.findall(r"\{[^{}]*:([^{}]*)\}", text):
        for digits in re.findall(r"\d+", spec):
            _width(int(digits) if len(digits) < 10 else MAX_STRING + 1)
    check_length(text, sum(text_size(a, MAX_STRING) for a in (*args, *kwargs.values())))


def _check_translate(text: str, table: Any) -> None:
    if isinstance(table, dict):
        longest = max((len(v) for v in table.values() if isinstance(v, str)), default=1)
        check_length(text, len(text) * max(longest - 1, 0))


def _check_split(text: str, sep: Any = None, maxsplit: Any = -1, **_: Any) -> None:
    """A split makes one object per piece: at most MAX_ITEMS of them (a 4 MiB string of
    two-character words would make two million)."""
    limit = MAX_ITEMS if not isinstance(maxsplit, int) or maxsplit < 0 \
        else min(maxsplit, MAX_ITEMS)
    if limit == MAX_ITEMS and len(text.split(sep, MAX_ITEMS)) > MAX_ITEMS:
        raise ConditionError(f"expression exceeds the list bound of {MAX_ITEMS} items: "
                             "split would make more pieces")


# str methods that may grow their result (or make many objects): each is checked before
# the method runs
STR_CHECKS: dict[str, Callable[..., None]] = {
    "split": _check_split, "rsplit": _check_split, "splitlines": lambda text, *a, **k: (
        _check_split(text, "\n")),
    "replace": _check_replace, "join": _check_join, "expandtabs": _check_expandtabs,
    "center": _check_pad, "ljust": _check_pad, "rjust": _check_pad, "zfill": _check_pad,
    "format": _check_format, "translate": _check_translate,
    "format_map": lambda text, mapping: _check_format(text, mapping),
}


def checked_method(text: str, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """``text.name`` as a callable that checks the result's size before calling it."""
    check = STR_CHECKS.get(name)
    if check is None:
        return method

    def call(*args: Any, **kwargs: Any) -> Any:
        check(text, *args, **kwargs)
        return method(*args, **kwargs)
    return call


class Budget:
    """Loop iterations, ``range()`` items and calls one Jinja render may still spend."""

    __slots__ = ("left",)

    def __init__(self, limit: int = MAX_LOOP) -> None:
        self.left = limit

    def charge(self, n: int = 1) -> None:
        self.left -= n
        if self.left < 0:
            raise ConditionError(f"template exceeds the loop budget of {MAX_LOOP} iterations")


BUDGET: contextvars.ContextVar[Budget] = contextvars.ContextVar("loopd_expr_budget")


def charge(n: int = 1) -> None:
    """Spend from the current render's budget (a fresh one outside any render)."""
    budget = BUDGET.get(None)
    if budget is None:  # e.g. constant folding at load time: one budget per call
        budget = Budget()
    budget.charge(n)


def charge_size(size: int) -> None:
    """Charge one unit per KiB a Jinja operation built: concatenating in a loop copies
    the growing string each time, so 100,000 appends of 10 bytes would copy 50 GB."""
    if size >= 1024:
        charge(size >> 10)


def budget_range(*args: int) -> range:
    """Jinja's ``range``: its items are charged to the render's loop budget up front."""
    rng = range(*args)
    charge(len(rng))
    return rng


def sliced(value: Any, start: Any, stop: Any, step: Any) -> Any:
    """Jinja's ``x[a:b:c]``: a slice copies what it keeps, charged per KiB."""
    result = value[slice(start, stop, step)]
    if isinstance(result, str | list | tuple):
        charge_size(len(result))
    return result


def contains(needle: Any, haystack: Any) -> bool:
    """Jinja's ``a in b``: scanning a long string or list is charged per KiB of it."""
    if isinstance(haystack, str | list | tuple):
        charge_size(len(haystack))
    return needle in haystack


def counted(iterable: Iterable[Any]) -> Iterator[Any]:
    """A ``for`` loop's iterable, each iteration charged to the render's budget."""
    if isinstance(iterable, range):  # budget_range charged it already
        yield from iterable
        return
    budget = BUDGET.get(None) or Budget()
    for item in iterable:
        budget.charge()
        yield item
