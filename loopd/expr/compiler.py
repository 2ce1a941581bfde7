"""Safe expressions and templates, compiled once at load time.

Conditions (``if:``) and templates (``key:``, ``input:``) use Jinja2 syntax.
Most of them are plain expressions (``event.labels.severity in ['critical']``,
``event.value > 90``), which this module compiles to a Python closure through a
whitelisted AST: about 50x faster than Jinja's sandbox, and just as safe:

* only literals, names from the scope, boolean/compare/arithmetic operators,
  conditional expressions, subscripts, attribute reads, and calls to a short
  list of pure functions and string/dict methods are accepted;
* attribute reads become dictionary lookups (``_get``), never ``getattr``;
  names starting with ``_`` are refused at compile time;
* a missing key reads as ``None`` (like Jinja's chainable undefined).

Anything outside that subset (filters ``|``, tests ``is defined``, ``~``,
statements) falls back to Jinja2's sandbox (``loopd.expr.sandbox``): slower, still safe.
Both paths raise ``ConditionError`` at evaluation and ``ValueError`` (turned into
a ``RuleError``/``PackError`` with a location by the caller) at compile time.

Both paths are bounded (``loopd.expr.bounds``): ``**``, ``*``, ``+`` and ``%`` become
calls to bounded operations that check the size of their result before computing it,
``str.replace`` and ``sum``/``str`` are checked the same way, a text template's output
is capped, and constant subexpressions are folded at compile time so that
``9 ** (9 ** 9)`` or ``'a' * 10 ** 9`` is a ``ValueError`` naming the bound. Plain
comparisons and lookups compile exactly as before.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.environment import TemplateExpression
from jinja2.parser import Parser

from loopd.errors import ConditionError
from loopd.events import Event
from loopd.expr import bounds, sandbox

Scope = Mapping[str, Any]

# Names a workflow's templates and conditions can read (see loopd.runs.runner.scope).
WORKFLOW_SCOPE = frozenset({
    "ctx", "input", "result", "status", "error", "item", "now", "event", "run", "inventory",
    "telemetry", "history", "key", "entity", "vars",
})
Compiled = Callable[[Scope], Any]

_EXPR = re.compile(r"\{\{(.*?)\}\}", re.S)
# what can build a structure bigger than the data it reads: operators, filters, calls
_BUILDS = re.compile(r"[*+%~|(]")
_CONSTANTS = {"true": True, "false": False, "none": None, "True": True, "False": False,
              "None": None}
FUNCTIONS: dict[str, Callable[..., Any]] = {
    "len": len, "int": int, "float": float, "str": bounds.bounded_str, "bool": bool, "abs": abs,
    "min": min, "max": max, "round": bounds.bounded_round, "sum": bounds.bounded_sum, "any": any,
    "all": all, "sorted": sorted,
}
# the fallback offers the same functions as the fast path
_JINJA = sandbox.make_environment(FUNCTIONS)
_METHODS: dict[type, set[str]] = {
    str: {"startswith", "endswith", "lower", "upper", "strip", "split", "replace", "count",
          "isdigit"},
    dict: {"get", "keys", "values", "items"},
    list: {"count", "index"},
}
_NODES = (
    ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.UAdd,
    ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Mod, ast.FloorDiv, ast.Compare,
    ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn, ast.Is, ast.IsNot,
    ast.Name, ast.Load, ast.Constant, ast.List, ast.Tuple, ast.Set, ast.Dict, ast.Attribute,
    ast.Subscript, ast.Call, ast.IfExp, ast.Slice, ast.Pow,
)
# operators that can build a value far bigger than their operands, and their bounded twins
_BOUNDED: dict[type[ast.operator], str] = {
    ast.Pow: "_power", ast.Mult: "_mul", ast.Add: "_add", ast.Mod: "_mod",
}
_FOLD: dict[type[ast.operator], Any] = {
    ast.Pow: bounds.power, ast.Mult: bounds.mul, ast.Add: bounds.add, ast.Mod: bounds.mod,
    ast.Sub: lambda a, b: a - b, ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b,
}


class _Unsupported(Exception):
    """The expression is outside the fast subset; use Jinja instead."""


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, dict):
        return obj.get(name)
    if isinstance(obj, Event):
        if name in _EVENT_FIELDS:
            return getattr(obj, name)
        return obj.data.get(name)
    return None


_EVENT_FIELDS = frozenset({"id", "source", "topic", "key", "time", "headers", "vars", "data"})


def _item(obj: Any, index: Any) -> Any:
    if isinstance(obj, dict | Event):
        return _get(obj, index) if isinstance(index, str) else None
    if isinstance(obj, list | tuple | str):
        try:
            return obj[index]
        except (IndexError, TypeError):
            return None
    return None


def _method(obj: Any, name: str) -> Callable[..., Any]:
    allowed = _METHODS.get(type(obj))
    if allowed is None or name not in allowed:
        raise ConditionError(f"method {name!r} is not available on {type(obj).__name__}")
    method: Callable[..., Any] = getattr(obj, name)
    if type(obj) is str:
        return bounds.checked_method(obj, name, method)
    return method


def _number(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) in (int, float)


def _fold(node: ast.AST) -> Any:
    """The value of a constant subexpression, computed with the bounded operations;
    raises ValueError naming the bound it exceeds, _Unsupported when it is not constant."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _fold(node.operand)
        if type(value) not in (int, float):
            raise _Unsupported("operand")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.List | ast.Tuple):
        items = [_fold(item) for item in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.BinOp) and type(node.op) in _FOLD:
        left, right = _fold(node.left), _fold(node.right)
        try:
            return _FOLD[type(node.op)](left, right)
        except ConditionError as exc:
            raise ValueError(str(exc)) from None
        except Exception:  # e.g. 1 / 0: an evaluation error, reported when evaluated
            raise _Unsupported("constant") from None
    raise _Unsupported("not constant")


class _Rewrite(ast.NodeTransformer):
    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self.used: set[str] = set()

    def generic_visit(self, node: ast.AST) -> ast.AST:
        if not isinstance(node, _NODES):
            raise _Unsupported(type(node).__name__)
        return super().generic_visit(node)

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in _CONSTANTS:
            return ast.copy_location(ast.Constant(_CONSTANTS[node.id]), node)
        if node.id in self.names:
            self.used.add(node.id)
            return node
        if node.id in FUNCTIONS:
            return node
        raise _Unsupported(node.id)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        if isinstance(node.operand, ast.BinOp) and isinstance(node.operand.op, ast.Pow):
            raise _Unsupported("-x ** y")  # Jinja reads (-x) ** y: let Jinja parse it
        return self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        if isinstance(node.op, ast.Pow) and isinstance(node.right, ast.BinOp) and \
                isinstance(node.right.op, ast.Pow):
            raise _Unsupported("x ** y ** z")  # Jinja's ** groups to the left
        helper = _BOUNDED.get(type(node.op))
        node = self.generic_visit(node)  # type: ignore[assignment]
        if helper is None or (isinstance(node.op, ast.Add) and
                              (_number(node.left) or _number(node.right))):
            return node  # -, /, // and adding a number cannot grow a value
        call = ast.Call(ast.Name(helper, ast.Load()), [node.left, node.right], [])
        return ast.copy_location(call, node)

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        if node.attr.startswith("_"):
            raise ValueError(f"attribute {node.attr!r} is not allowed")
        value = self.visit(node.value)
        call = ast.Call(ast.Name("_get", ast.Load()), [value, ast.Constant(node.attr)], [])
        return ast.copy_location(call, node)

    def visit_Subscript(self, node: ast.Subscript) -> ast.AST:
        if isinstance(node.slice, ast.Slice):
            return self.generic_visit(node)
        value, index = self.visit(node.value), self.visit(node.slice)
        call = ast.Call(ast.Name("_item", ast.Load()), [value, index], [])
        return ast.copy_location(call, node)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        if node.keywords:
            raise _Unsupported("keyword arguments")
        args = [self.visit(a) for a in node.args]
        func = node.func
        if isinstance(func, ast.Name) and func.id in FUNCTIONS:
            return ast.copy_location(ast.Call(func, args, []), node)
        if isinstance(func, ast.Attribute) and not func.attr.startswith("_"):
            target = ast.Call(ast.Name("_method", ast.Load()),
                              [self.visit(func.value), ast.Constant(func.attr)], [])
            return ast.copy_location(ast.Call(target, args, []), node)
        raise _Unsupported("call")


@functools.lru_cache(maxsize=4096)
def _compile_fast(source: str, names: frozenset[str]) -> Compiled:
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError:
        raise _Unsupported("syntax") from None
    problem = None
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and problem is None:
            try:
                _fold(node)  # refuses 9 ** (9 ** 9) now, not when an event arrives
            except _Unsupported:
                pass
            except ValueError as exc:
                problem = exc
    rewrite = _Rewrite(names)
    body = rewrite.visit(tree).body  # _Unsupported first: Jinja parses ** differently
    if problem is not None:
        raise problem
    ordered = sorted(rewrite.used)  # the closure takes only the names it reads
    lam = ast.Lambda(
        ast.arguments(posonlyargs=[], args=[ast.arg(n) for n in ordered], kwonlyargs=[],
                      kw_defaults=[], defaults=[]),
        body,
    )
    module = ast.fix_missing_locations(ast.Expression(lam))
    env: dict[str, Any] = {"__builtins__": {}, "_get": _get, "_item": _item,
                           "_method": _method, "_power": bounds.power, "_mul": bounds.mul,
                           "_add": bounds.add, "_mod": bounds.mod, **FUNCTIONS}
    fn = eval(compile(module, "<loopd-expression>", "eval"), env)  # whitelisted AST only

    if len(ordered) == 1:
        (only,) = ordered

        def run_one(scope: Scope) -> Any:
            try:
                return fn(scope.get(only))
            except ConditionError as exc:  # a bound or a method: say where
                raise ConditionError(f"{exc} in {source.strip()!r}") from None
            except Exception as exc:  # any evaluation error of user code, e.g. None > 3
                raise ConditionError(
                    f"{source.strip()!r}: {type(exc).__name__}: {exc}") from None

        return run_one

    def run(scope: Scope) -> Any:
        try:
            return fn(*[scope.get(n) for n in ordered])
        except ConditionError as exc:
            raise ConditionError(f"{exc} in {source.strip()!r}") from None
        except Exception as exc:  # any evaluation error of user code, e.g. None > 3
            raise ConditionError(f"{source.strip()!r}: {type(exc).__name__}: {exc}") from None

    return run


def _jinja_scope(scope: Scope) -> dict[str, Any]:
    """Jinja sees an Event as a mapping: its data plus its envelope fields."""
    out = dict(scope)
    for name, value in scope.items():
        if isinstance(value, Event):
            view = dict(value.data)
            view.update({f: getattr(value, f) for f in _EVENT_FIELDS})
            out[name] = view
    return out


def _refuse_private(tree: nodes.Node) -> None:
    """Refuse ``x._name`` at compile time, as the fast path does (the sandbox would
    only turn it into an undefined value at evaluation)."""
    for node in tree.find_all(nodes.Getattr):
        if node.attr.startswith("_"):
            raise ValueError(f"attribute {node.attr!r} is not allowed")


def _compile_jinja_expression(source: str) -> Compiled:
    try:
        parser = Parser(_JINJA, source.strip(), state="variable")
        parsed = parser.parse_expression()
        if not parser.stream.eos:
            raise jinja2.TemplateSyntaxError("chunk after expression",
                                             parser.stream.current.lineno, None, None)
        _refuse_private(parsed)
        body = [nodes.Assign(nodes.Name("result", "store"), parsed, lineno=1)]
        tree = sandbox.prepare(_JINJA, nodes.Template(body, lineno=1))
        expr = TemplateExpression(_JINJA.from_string(tree), undefined_to_none=True)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"invalid expression {source.strip()!r}: {exc.message}") from None

    def run(scope: Scope) -> Any:
        try:
            return sandbox.evaluate(expr, _jinja_scope(scope))
        except ConditionError as exc:
            raise ConditionError(f"{exc} in {source.strip()!r}") from None
        except jinja2.TemplateError as exc:
            raise ConditionError(f"{source.strip()!r}: {exc}") from None
        except Exception as exc:  # evaluation error inside user code
            raise ConditionError(f"{source.strip()!r}: {type(exc).__name__}: {exc}") from None

    return run


def compile_expression(text: str, names: frozenset[str]) -> Compiled:
    """Compile a condition; ``{{ ... }}`` around it is optional."""
    match = _EXPR.fullmatch(text.strip())
    source = match.group(1) if match else text
    if not source.strip():
        raise ValueError("empty expression")
    try:
        return _compile_fast(source, names)
    except _Unsupported:
        return _compile_jinja_expression(source)


def compile_template(text: Any, names: frozenset[str]) -> Compiled:
    """Compile a value that may contain templates.

    A string that is exactly one ``{{ expr }}`` keeps the expression's native
    type (a number stays a number); other strings render to text; dicts and
    lists are compiled item by item; other values are constants.
    """
    if isinstance(text, dict):
        parts = {k: compile_template(v, names) for k, v in text.items()}
        return lambda scope: {k: f(scope) for k, f in parts.items()}
    if isinstance(text, list):
        items = [compile_template(v, names) for v in text]
        return lambda scope: [f(scope) for f in items]
    if not isinstance(text, str) or ("{{" not in text and "{%" not in text):
        return lambda scope: text
    return _compile_text(text, names)


@functools.lru_cache(maxsize=4096)
def _compile_text(text: str, names: frozenset[str]) -> Compiled:
    """``compile_template`` of a string with a template in it. Cached: a thousand rules
    repeat a handful of templates, and what this returns only reads its scope."""
    single = _EXPR.fullmatch(text.strip())
    if single and "{{" not in single.group(1):
        expression = compile_expression(single.group(1), names)
        if not _BUILDS.search(single.group(1)):
            return expression  # a lookup returns event data or a literal as it is

        def value(scope: Scope) -> Any:
            result = expression(scope)
            if type(result) not in bounds.SCALARS:
                bounds.text_size(result)  # [s] * 100000 would be gigabytes as JSON
            return result

        return value
    if "{%" not in text and "{#" not in text:
        try:
            return _compile_fast_text(text, names)
        except _Unsupported:
            pass
    try:
        tree = _JINJA.parse(text)
        _refuse_private(tree)
        template = _JINJA.from_string(sandbox.prepare(_JINJA, tree))
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"invalid template {text!r}: {exc.message}") from None

    def render(scope: Scope) -> Any:
        try:
            return sandbox.render(template, _jinja_scope(scope))
        except ConditionError as exc:  # a bound: named first, the engine keeps 500 chars
            raise ConditionError(f"{exc} in template {text!r}") from None
        except jinja2.TemplateError as exc:
            raise ConditionError(f"template {text!r}: {exc}") from None
        except Exception as exc:  # evaluation error inside user code
            raise ConditionError(f"template {text!r}: {type(exc).__name__}: {exc}") from None

    return render


def _compile_fast_text(text: str, names: frozenset[str]) -> Compiled:
    pieces: list[Compiled | str] = []
    pos = 0
    for m in _EXPR.finditer(text):
        if m.start() > pos:
            pieces.append(text[pos:m.start()])
        pieces.append(_compile_fast(m.group(1), names))
        pos = m.end()
    if pos < len(text):
        pieces.append(text[pos:])
    if any(isinstance(p, str) and "{{" in p for p in pieces):
        raise _Unsupported("unclosed {{")  # Jinja's parser reports it as a syntax error

    def render(scope: Scope) -> str:
        out = []
        for p in pieces:
            if isinstance(p, str):
                out.append(p)
                continue
            value = p(scope)
            if type(value) is str:
                out.append(value)
            elif value is not None:
                out.append(bounds.bounded_str(value))
        # each piece is bounded on its own and their number is fixed: check the sum once
        rendered = "".join(out)
        if len(rendered) > bounds.MAX_OUTPUT:
            raise ConditionError(f"template {text!r} exceeds the output bound of "
                                 f"{bounds.MAX_OUTPUT} characters")
        return rendered

    return render
