"""The Jinja fallback: an immutable sandbox whose templates stay within ``loopd.expr.bounds``.

On top of Jinja's ``ImmutableSandboxedEnvironment`` (no ``_`` attributes, no mutation
of lists and dicts, so ``l.extend(l)`` cannot double a list per iteration):

* ``lipsum`` is gone (it generates text out of nothing); ``range`` charges its items
  to the render's loop budget; the fast path's bounded functions replace Python's;
* ``**``, ``*``, ``+`` and ``%`` are intercepted (``call_binop``): the bounded
  operations run instead, and Jinja's optimizer can no longer fold them at load time;
* the parsed tree is rewritten before it is compiled: every ``for`` iterable is wrapped
  by ``bounds.counted`` (each iteration charged to the budget), every ``~`` becomes
  ``bounds.concat``; every call costs one unit, a macro or ``loop()`` call ``MACRO_CALL``;
* every filter charges its input's length (one unit per 16 items) and checks its width
  or count argument before it allocates (``center``, ``indent``, ``format``, ``join``,
  ``batch``, ...);
* a value turned into output is size-checked (``finalize``), and ``render`` stops once
  the output passes ``MAX_OUTPUT``.

``static_problem`` folds constant subexpressions of a parsed tree with the same bounded
operations so that ``{{ 9 ** (9 ** 9) }}`` is refused at load time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.runtime import Context, LoopContext, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from loopd.errors import ConditionError
from loopd.expr import bounds

MACRO_CALL = 10  # budget units one macro call (and a recursive loop()) costs
# generators of data out of nothing, not offered to loopd templates
REMOVED_GLOBALS = frozenset({"lipsum"})


def _finalize(value: Any) -> Any:
    if not isinstance(value, str | int | float | bool | None):
        bounds.text_size(value)
    return value


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with loopd's bounds on operators, calls and filters."""

    intercepted_binops = frozenset({"**", "*", "+", "%"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        result = bounds.BINOPS[operator](left, right)
        if isinstance(result, str | bytes | list | tuple):
            bounds.charge_size(len(result))  # growing a string in a loop is quadratic
        return result

    def call(__self, __context: Context, __obj: Any, *args: Any,
             **kwargs: Any) -> Any:
        # a macro call (or a recursive loop()) costs about as much as ten loop turns
        bounds.charge(MACRO_CALL if isinstance(__obj, Macro | LoopContext) else 1)
        target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str | list | tuple | dict):
            bounds.charge_size(len(owner))  # a method reads its whole receiver, per call
        if isinstance(owner, str):
            bounds.STR_CHECKS.get(getattr(target, "__name__", ""), _no_check)(
                owner, *args, **kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, str | list | tuple):
            bounds.charge_size(len(result))
        return result

    def getitem(self, obj: Any, argument: Any) -> Any:
        result = super().getitem(obj, argument)
        if isinstance(argument, slice) and isinstance(result, str | list | tuple):
            bounds.charge_size(len(result))  # a slice copies what it keeps
        return result


def _no_check(*args: Any, **kwargs: Any) -> None:
    return None


def _int_arg(name: str, value: Any, limit: int) -> None:
    if isinstance(value, int) and value > limit:
        raise ConditionError(f"filter argument {name}={value} exceeds its bound of {limit}")


def _check_filter(name: str, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse a filter call whose result would pass a bound, before it runs."""
    def arg(index: int, key: str, default: Any) -> Any:
        return args[index] if len(args) > index else kwargs.get(key, default)

    if name == "center":
        _int_arg("width", arg(0, "width", 80), bounds.MAX_STRING)
    elif name == "indent":
        width = arg(0, "width", 4)
        if isinstance(width, int):
            _int_arg("width", width, bounds.MAX_STRING)
            width = " " * width
        if isinstance(value, str) and isinstance(width, str):
            bounds.check_length(value, (value.count("\n") + 1) * len(width))
    elif name == "wordwrap" and isinstance(value, str):
        wrap = arg(2, "wrapstring", "\n")
        bounds.check_length(value, len(value) * len(wrap or ""))
    elif name in ("batch", "slice"):
        what = "linecount" if name == "batch" else "slices"
        _int_arg(what, arg(0, what, 0), bounds.MAX_ITEMS)
    elif name == "round":
        bounds.check_round(value, arg(0, "precision", 0))
    elif name == "format" and isinstance(value, str):
        _check_printf(value, args, kwargs)
    elif name == "join":
        sep = arg(0, "d", "")
        if isinstance(value, list | tuple) and isinstance(sep, str):
            bounds.check_length(sep, len(sep) * len(value))
            bounds.text_size(value, bounds.MAX_STRING)
    elif name == "replace" and isinstance(value, str):
        old, new, count = arg(0, "old", ""), arg(1, "new", ""), arg(2, "count", None)
        if isinstance(old, str) and isinstance(new, str):
            bounds.STR_CHECKS["replace"](value, old, new, -1 if count is None else count)
    elif name in ("tojson", "pprint", "string", "xmlattr", "urlencode"):
        bounds.text_size(value)


def _check_printf(value: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """The ``format`` filter is ``value % args``: checked like the ``%`` operator."""
    probe: Any = kwargs if kwargs else args
    extra = bounds.text_size(probe, bounds.MAX_STRING)
    for m in bounds.PRINTF.finditer(value):
        for size in m.groups():
            if size == "*":
                raise ConditionError("expression uses a '*' width in % formatting")
            if size:
                extra += int(size) if len(size) < 10 else bounds.MAX_STRING + 1
    bounds.check_length(value, extra)


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    passes = getattr(func, "jinja_pass_arg", None) is not None

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        value, rest = (args[1], args[2:]) if passes else (args[0], args[1:])
        if hasattr(value, "__len__"):  # a filter visits each item, ~1/16 of a loop turn
            bounds.charge(len(value) >> 4)
        _check_filter(name, value, rest, kwargs)
        return func(*args, **kwargs)

    return run


def _sum_filter(environment: jinja2.Environment, iterable: Any,
                attribute: str | int | None = None, start: Any = 0) -> Any:
    if attribute is not None:
        iterable = [environment.getitem(item, attribute) for item in iterable]
    return bounds.bounded_sum(iterable, start)


_sum_filter.jinja_pass_arg = jinja2.utils._PassArg.environment  # type: ignore[attr-defined]


class _Bound(NodeTransformer):
    """Wrap loop iterables and ``~`` in the bounded helpers."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = nodes.Call(nodes.ImportedName("loopd.expr.bounds.counted"), [node.iter],
                               [], None, None, lineno=node.lineno)
        return node

    def visit_Getitem(self, node: nodes.Getitem) -> nodes.Node:
        self.generic_visit(node)
        if node.ctx != "load" or not isinstance(node.arg, nodes.Slice):
            return node
        part = node.arg
        bounds_ = [p if p is not None else nodes.Const(None)
                   for p in (part.start, part.stop, part.step)]
        return nodes.Call(nodes.ImportedName("loopd.expr.bounds.sliced"),
                          [node.node, *bounds_], [], None, None, lineno=node.lineno)

    def visit_Compare(self, node: nodes.Compare) -> nodes.Node:
        self.generic_visit(node)
        if len(node.ops) != 1 or node.ops[0].op not in ("in", "notin"):
            return node  # a chain with `in` is rare: its scan is bounded by its operands
        call = nodes.Call(nodes.ImportedName("loopd.expr.bounds.contains"),
                          [node.expr, node.ops[0].expr], [], None, None, lineno=node.lineno)
        return nodes.Not(call, lineno=node.lineno) if node.ops[0].op == "notin" else call

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Call(nodes.ImportedName("loopd.expr.bounds.concat"), node.nodes, [],
                          None, None, lineno=node.lineno)


def make_environment(functions: dict[str, Callable[..., Any]]) -> BoundedSandbox:
    env = BoundedSandbox(undefined=jinja2.ChainableUndefined, autoescape=False,
                         finalize=_finalize)
    for name in REMOVED_GLOBALS:
        env.globals.pop(name, None)
    env.globals.update(functions)
    env.globals["range"] = bounds.budget_range
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.filters["sum"] = _bounded_filter("sum", _sum_filter)
    return env


def prepare(env: BoundedSandbox, tree: nodes.Template) -> nodes.Template:
    """Refuse what is out of bounds at load time, then wrap loops and ``~``."""
    for name in tree.find_all(nodes.Name):
        if name.ctx == "load" and name.name in REMOVED_GLOBALS:
            raise ValueError(f"function {name.name!r} is not available in loopd templates")
    problem = static_problem(env, tree)
    if problem is not None:
        raise ValueError(problem)
    out = _Bound().visit(tree)
    assert isinstance(out, nodes.Template)
    return out


def render(template: jinja2.Template, scope: dict[str, Any]) -> str:
    """Render with a fresh loop budget, stopping once the output passes MAX_OUTPUT."""
    token = bounds.BUDGET.set(bounds.Budget())
    try:
        out: list[str] = []
        size = 0
        for chunk in template.generate(**scope):
            size += len(chunk)
            if size > bounds.MAX_OUTPUT:
                raise ConditionError(
                    f"template exceeds the output bound of {bounds.MAX_OUTPUT} characters")
            out.append(chunk)
        return "".join(out)
    finally:
        bounds.BUDGET.reset(token)


def evaluate(expression: Callable[..., Any], scope: dict[str, Any]) -> Any:
    """Evaluate a compiled Jinja expression with a fresh loop budget."""
    token = bounds.BUDGET.set(bounds.Budget())
    try:
        return expression(**scope)
    finally:
        bounds.BUDGET.reset(token)


# -- load time: constant folding with the bounded operations ---------------------------

class _NotStatic(Exception):
    """The subtree reads a name or calls something unknown: only known at evaluation."""


def _static(env: BoundedSandbox, node: nodes.Node) -> Any:
    if isinstance(node, nodes.Const):
        return node.value
    if isinstance(node, nodes.List | nodes.Tuple):
        items = [_static(env, item) for item in node.items]
        return items if isinstance(node, nodes.List) else tuple(items)
    if isinstance(node, nodes.Neg):
        return -_static(env, node.node)
    if isinstance(node, nodes.Pos):
        return +_static(env, node.node)
    if isinstance(node, nodes.BinExpr):
        left, right = _static(env, node.left), _static(env, node.right)
        op = bounds.BINOPS.get(node.operator)
        if op is None:
            raise _NotStatic
        try:
            return op(left, right)
        except ConditionError:
            raise
        except Exception:  # e.g. 1 / 0 or 'a' + 1: an evaluation error, reported then
            raise _NotStatic from None
    if isinstance(node, nodes.Concat):
        return bounds.concat(*[_static(env, n) for n in node.nodes])
    if isinstance(node, nodes.Call) and isinstance(node.node, nodes.Name) and \
            node.node.name == "range" and not node.kwargs and node.dyn_args is None:
        args = [_static(env, a) for a in node.args]
        if all(isinstance(a, int) for a in args):
            try:
                return range(*args)
            except ValueError:
                raise _NotStatic from None
    if isinstance(node, nodes.Filter) and node.node is not None and \
            node.dyn_args is None and node.dyn_kwargs is None and node.name in env.filters:
        value = _static(env, node.node)
        given = tuple(_static(env, a) for a in node.args)
        named = {str(k.key): _static(env, k.value) for k in node.kwargs
                 if isinstance(k, nodes.Keyword)}
        _check_filter(node.name, value, given, named)
        raise _NotStatic  # checked only: filters run at evaluation
    raise _NotStatic


def _loops(env: BoundedSandbox, node: nodes.Node, outer: int) -> Iterator[int]:
    """Iterations of each statically sized loop nest, outer loops multiplied in."""
    if not isinstance(node, nodes.For):
        for child in node.iter_child_nodes():
            yield from _loops(env, child, outer)
        return
    try:
        size = len(_static(env, node.iter))
    except (_NotStatic, TypeError):
        size = 1
    yield outer * size
    for part in (*node.body, *node.else_):
        yield from _loops(env, part, outer * size)


def static_problem(env: BoundedSandbox, tree: nodes.Node) -> str | None:
    """What a constant part of ``tree`` would exceed, or None."""
    try:
        for node in tree.find_all((nodes.BinExpr, nodes.Concat, nodes.Call, nodes.Filter)):
            try:
                value = _static(env, node)
            except _NotStatic:
                continue
            if isinstance(value, range) and len(value) > bounds.MAX_LOOP:
                return (f"range of {len(value)} items exceeds the loop budget of "
                        f"{bounds.MAX_LOOP} iterations")
        for iterations in _loops(env, tree, 1):
            if iterations > bounds.MAX_LOOP:
                return (f"template exceeds the loop budget of {bounds.MAX_LOOP} iterations "
                        f"({iterations} in nested loops)")
    except ConditionError as exc:
        return str(exc)
    return None
