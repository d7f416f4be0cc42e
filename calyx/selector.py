"""Label selectors in Calico's grammar: parser, canonical form, and a compiled evaluator.

A selector picks workloads (policy ``selector``, rule ``selector``/``not_selector``) or nodes
(``node_selector``, ``peer_selector``) by their labels::

    all()                       every label set (also the empty or blank selector)
    has(k)        !has(k)       label k is present / absent
    k == 'v'      k != 'v'      k present with value v / anything else, including k absent
    k in {'a', 'b'}             k present with one of the values (``{}`` matches nothing)
    k not in {'a', 'b'}         anything else, including k absent
    k contains 's'              k present and its value contains / starts with / ends with s
    k starts with 's'
    k ends with 's'
    !e    e && e    e || e    (e)

``!`` binds tighter than ``&&``, which binds tighter than ``||``; ``!`` applies to one operation
or one parenthesised group (``!k == 'v'`` is ``!(k == 'v')``). Strings are single- or
double-quoted, with no escapes: a value cannot contain its own quote character. Label keys are
runs of ``[A-Za-z0-9_./-]`` of at most 512 characters (``projectcalico.org/namespace``).
Whitespace is space, tab, CR or LF. Calico's ``global()`` has no meaning in Calyx (no
namespaces) and is refused.

Differences from Calico that a user could notice: ``has (k)`` with a space is accepted;
operator words need a word boundary (``k inx`` is an error, not ``k in x``).

``parse`` returns an immutable :class:`Selector`; results are cached by text. Its ``canonical``
text is a normal form (flattened ``&&``/``||``, no redundant parentheses, double negation
removed, ``!(k == 'v')`` written ``k != 'v'``, set members sorted and deduplicated, single quotes
unless the value holds one) and is what equality, hashing and ``unique_id`` use. ``unique_id``
names ipsets, so the canonical form and its hash are a stable contract: changing either renames
every selector ipset in the cluster.

Evaluation runs a tree of closures built once at parse time; nesting is capped at
:data:`MAX_DEPTH` parentheses so that neither the parser nor the evaluator can reach Python's
recursion limit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NoReturn

__all__ = ["MAX_DEPTH", "MAX_KEY_LENGTH", "Selector", "SelectorError", "parse"]

MAX_DEPTH: Final = 100
"""Deepest nesting of parentheses accepted."""

MAX_KEY_LENGTH: Final = 512
"""Longest label key accepted (Calico's limit)."""

_WHITESPACE: Final = frozenset(" \t\r\n")
_KEY_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_./-")
_FUNCTIONS: Final = ("has", "all")
_OPERATORS_HELP: Final = "==, !=, in, not in, contains, starts with, ends with"
_ERROR_TEXT_LIMIT: Final = 120

Labels = Mapping[str, str]
Matcher = Callable[[Labels], bool]


class SelectorError(ValueError):
    """A selector that does not parse; says what is wrong and at which 0-based character position."""

    def __init__(self, reason: str, text: str, position: int) -> None:
        self.reason = reason
        self.text = text
        self.position = position
        super().__init__(f"{reason} at position {position} in {_excerpt(text, position)}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.text, self.position))


def _excerpt(text: str, position: int) -> str:
    if len(text) <= _ERROR_TEXT_LIMIT:
        return repr(text)
    start = max(0, position - _ERROR_TEXT_LIMIT // 2)
    end = min(len(text), start + _ERROR_TEXT_LIMIT)
    return f"{'…' if start else ''}{text[start:end]!r}{'…' if end < len(text) else ''} (characters {start}-{end})"


# --- the syntax tree (private; normalised by the smart constructors below) -------------------


@dataclass(frozen=True, slots=True)
class _All:
    pass


@dataclass(frozen=True, slots=True)
class _Has:
    key: str


@dataclass(frozen=True, slots=True)
class _Compare:
    key: str
    op: str  # "==", "!=", "contains", "starts with" or "ends with"
    value: str


@dataclass(frozen=True, slots=True)
class _InSet:
    key: str
    values: tuple[str, ...]  # sorted, unique
    negated: bool


@dataclass(frozen=True, slots=True)
class _Not:
    operand: _Node


@dataclass(frozen=True, slots=True)
class _And:
    operands: tuple[_Node, ...]  # at least two, none of them an _And


@dataclass(frozen=True, slots=True)
class _Or:
    operands: tuple[_Node, ...]  # at least two, none of them an _Or


_Node = _All | _Has | _Compare | _InSet | _Not | _And | _Or

_NEGATED_OP: Final = {"==": "!=", "!=": "=="}


def _negate(node: _Node) -> _Node:
    if isinstance(node, _Not):
        return node.operand
    if isinstance(node, _Compare) and node.op in _NEGATED_OP:
        return _Compare(node.key, _NEGATED_OP[node.op], node.value)
    if isinstance(node, _InSet):
        return _InSet(node.key, node.values, not node.negated)
    return _Not(node)


def _and(nodes: list[_Node]) -> _Node:
    if len(nodes) == 1:
        return nodes[0]
    flat: list[_Node] = []
    for node in nodes:
        flat.extend(node.operands if isinstance(node, _And) else (node,))
    return _And(tuple(flat))


def _or(nodes: list[_Node]) -> _Node:
    if len(nodes) == 1:
        return nodes[0]
    flat: list[_Node] = []
    for node in nodes:
        flat.extend(node.operands if isinstance(node, _Or) else (node,))
    return _Or(tuple(flat))


# --- canonical text ---------------------------------------------------------------------------


def _quote(value: str) -> str:
    return f'"{value}"' if "'" in value else f"'{value}'"


def _render(node: _Node) -> str:
    if isinstance(node, _All):
        return "all()"
    if isinstance(node, _Has):
        return f"has({node.key})"
    if isinstance(node, _Compare):
        return f"{node.key} {node.op} {_quote(node.value)}"
    if isinstance(node, _InSet):
        members = ", ".join(_quote(v) for v in node.values)
        return f"{node.key} {'not in' if node.negated else 'in'} {{{members}}}"
    if isinstance(node, _Not):
        inner = _render(node.operand)
        return f"!{inner}" if isinstance(node.operand, _All | _Has) else f"!({inner})"
    if isinstance(node, _And):
        return " && ".join(f"({_render(o)})" if isinstance(o, _Or) else _render(o) for o in node.operands)
    return " || ".join(_render(o) for o in node.operands)


def _keys(node: _Node, into: set[str]) -> None:
    if isinstance(node, _Has | _Compare | _InSet):
        into.add(node.key)
    elif isinstance(node, _Not):
        _keys(node.operand, into)
    elif isinstance(node, _And | _Or):
        for operand in node.operands:
            _keys(operand, into)


# --- compilation to closures ------------------------------------------------------------------


def _compile(node: _Node) -> Matcher:
    if isinstance(node, _All):
        return lambda labels: True
    if isinstance(node, _Has):
        key = node.key
        return lambda labels: key in labels
    if isinstance(node, _Compare):
        return _compile_compare(node.key, node.op, node.value)
    if isinstance(node, _InSet):
        key, members = node.key, frozenset(node.values)
        if node.negated:
            return lambda labels: labels.get(key) not in members
        return lambda labels: labels.get(key) in members
    if isinstance(node, _Not):
        inner = _compile(node.operand)
        return lambda labels: not inner(labels)
    if isinstance(node, _And):
        return _compile_and([_compile(o) for o in node.operands])
    return _compile_or([_compile(o) for o in node.operands])


def _compile_compare(key: str, op: str, value: str) -> Matcher:
    if op == "==":
        return lambda labels: labels.get(key) == value
    if op == "!=":
        return lambda labels: labels.get(key) != value
    if op == "contains":

        def contains(labels: Labels) -> bool:
            actual = labels.get(key)
            return actual is not None and value in actual

        return contains
    if op == "starts with":

        def starts_with(labels: Labels) -> bool:
            actual = labels.get(key)
            return actual is not None and actual.startswith(value)

        return starts_with

    def ends_with(labels: Labels) -> bool:
        actual = labels.get(key)
        return actual is not None and actual.endswith(value)

    return ends_with


def _compile_and(parts: list[Matcher]) -> Matcher:
    if len(parts) == 2:
        first, second = parts
        return lambda labels: first(labels) and second(labels)
    all_parts = tuple(parts)

    def match_all(labels: Labels) -> bool:
        for part in all_parts:  # noqa: SIM110 (a plain loop beats all() + generator in this hot path)
            if not part(labels):
                return False
        return True

    return match_all


def _compile_or(parts: list[Matcher]) -> Matcher:
    if len(parts) == 2:
        first, second = parts
        return lambda labels: first(labels) or second(labels)
    any_parts = tuple(parts)

    def match_any(labels: Labels) -> bool:
        for part in any_parts:  # noqa: SIM110 (a plain loop beats any() + generator in this hot path)
            if part(labels):
                return True
        return False

    return match_any


# --- the public object ------------------------------------------------------------------------


class Selector:
    """A parsed selector. Build it with :func:`parse`; immutable, hashable, equal by canonical form.

    ``evaluate(labels)`` is True when the label mapping matches. It is the compiled closure itself,
    stored on the instance rather than wrapped in a method: the wrapper would add about a third to
    the cost of a typical call.
    """

    __slots__ = ("_root", "canonical", "evaluate", "label_keys", "unique_id")

    canonical: str
    unique_id: str
    label_keys: frozenset[str]
    evaluate: Matcher
    _root: _Node

    def __init__(self, root: _Node) -> None:
        canonical = _render(root)
        keys: set[str] = set()
        _keys(root, keys)
        setter = object.__setattr__
        setter(self, "_root", root)
        setter(self, "evaluate", _compile(root))
        setter(self, "canonical", canonical)
        # surrogatepass: a lone surrogate (possible in JSON input) must hash, not raise.
        import hashlib  # only for unique ids: keeps the import cheap for start-up-bound callers (CNI)

        digest = hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()
        setter(self, "unique_id", digest[:16])
        setter(self, "label_keys", frozenset(keys))

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"Selector is immutable (cannot set {name!r})")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"Selector is immutable (cannot delete {name!r})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Selector):
            return NotImplemented
        return self.canonical == other.canonical

    def __hash__(self) -> int:
        return hash(self.canonical)

    def __str__(self) -> str:
        return self.canonical

    def __repr__(self) -> str:
        return f"Selector({self.canonical!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (parse, (self.canonical,))


# --- the parser -------------------------------------------------------------------------------


class _Parser:
    """Recursive descent over characters (the tokens depend on context: ``in`` after a key is an
    operator, elsewhere a key). Recursion happens only at ``(``, which is counted and capped."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.depth = 0

    def fail(self, reason: str, position: int | None = None) -> NoReturn:
        raise SelectorError(reason, self.text, self.pos if position is None else position)

    def skip_ws(self) -> None:
        text, pos = self.text, self.pos
        while pos < len(text) and text[pos] in _WHITESPACE:
            pos += 1
        self.pos = pos

    def peek(self) -> str:
        """The next character after whitespace, or '' at the end."""
        self.skip_ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def found(self) -> str:
        """What stands at the current position, for error messages."""
        if self.pos >= len(self.text):
            return "end of selector"
        word = self.read_key_chars(self.pos)
        return repr(word) if word else repr(self.text[self.pos])

    def read_key_chars(self, start: int) -> str:
        text, end = self.text, start
        while end < len(text) and text[end] in _KEY_CHARS:
            end += 1
        return text[start:end]

    def parse(self) -> _Node:
        if self.peek() == "":
            return _All()
        node = self.parse_or()
        if self.peek() != "":
            self.fail_after_expression()
        return node

    def fail_after_expression(self) -> NoReturn:
        char = self.text[self.pos]
        if char in "&|":
            self.fail(f"expected '{char * 2}', found {char!r}")
        if char == ")":
            self.fail("unbalanced ')'")
        self.fail(f"expected '&&', '||' or the end of the selector, found {self.found()}")

    def parse_or(self) -> _Node:
        terms = [self.parse_and()]
        while self.peek() == "|" and self.text.startswith("||", self.pos):
            self.pos += 2
            terms.append(self.parse_and())
        return _or(terms)

    def parse_and(self) -> _Node:
        terms = [self.parse_unary()]
        while self.peek() == "&" and self.text.startswith("&&", self.pos):
            self.pos += 2
            terms.append(self.parse_unary())
        return _and(terms)

    def parse_unary(self) -> _Node:
        negations = 0
        while self.peek() == "!":
            if self.text.startswith("!=", self.pos):
                self.fail("expected an expression before '!='")
            negations += 1
            self.pos += 1
        node = self.parse_primary()
        return _negate(node) if negations % 2 else node

    def parse_primary(self) -> _Node:
        if self.peek() == "(":
            # Recursion (four frames a level) happens only here, hence the cap.
            opened = self.pos
            self.depth += 1
            if self.depth > MAX_DEPTH:
                self.fail(f"parentheses nested deeper than {MAX_DEPTH} levels")
            self.pos += 1
            if self.peek() == ")":
                self.fail("expected an expression inside '()'")
            node = self.parse_or()
            if self.peek() != ")":
                self.fail(f"expected ')' to close the '(' at position {opened}, found {self.found()}")
            self.pos += 1
            self.depth -= 1
            return node
        start = self.pos
        key = self.read_key_chars(start)
        if not key:
            self.fail(f"expected a label key, has(), all(), '!' or '(', found {self.found()}")
        self.pos += len(key)
        if self.peek() == "(":
            return self.parse_function(key, start)
        self.check_key(key, start)
        return self.parse_operation(key)

    def parse_function(self, name: str, start: int) -> _Node:
        if name not in _FUNCTIONS:
            self.fail(f"unknown function '{name}()' (expected has() or all())", start)
        self.pos += 1  # the '('
        if name == "all":
            if self.peek() != ")":
                self.fail(f"expected ')' after 'all(', found {self.found()}")
            self.pos += 1
            return _All()
        self.skip_ws()
        key_start = self.pos
        key = self.read_key_chars(key_start)
        if not key:
            self.fail(f"expected a label key in has(), found {self.found()}")
        self.check_key(key, key_start)
        self.pos += len(key)
        if self.peek() != ")":
            self.fail(f"expected ')' after the label key in has(), found {self.found()}")
        self.pos += 1
        return _Has(key)

    def check_key(self, key: str, start: int) -> None:
        if len(key) > MAX_KEY_LENGTH:
            self.fail(f"label key longer than {MAX_KEY_LENGTH} characters", start)

    def word(self, word: str) -> bool:
        """Consume ``word`` if it stands at the current position as a whole word."""
        end = self.pos + len(word)
        if self.text.startswith(word, self.pos) and (end >= len(self.text) or self.text[end] not in _KEY_CHARS):
            self.pos = end
            return True
        return False

    def two_words(self, first: str, second: str) -> bool:
        """Consume ``first`` then ``second`` (whitespace between optional, as in Calico)."""
        if not self.text.startswith(first, self.pos):
            return False
        saved = self.pos
        self.pos += len(first)
        self.skip_ws()
        if self.word(second):
            return True
        self.pos = saved
        return False

    def parse_operation(self, key: str) -> _Node:
        self.peek()
        op_start = self.pos
        text = self.text
        if text.startswith("==", op_start):
            self.pos += 2
            return _Compare(key, "==", self.parse_string())
        if text.startswith("!=", op_start):
            self.pos += 2
            return _Compare(key, "!=", self.parse_string())
        if self.word("contains"):
            return _Compare(key, "contains", self.parse_string())
        if self.two_words("starts", "with"):
            return _Compare(key, "starts with", self.parse_string())
        if self.two_words("ends", "with"):
            return _Compare(key, "ends with", self.parse_string())
        if self.word("in"):
            return _InSet(key, self.parse_set(), negated=False)
        if self.two_words("not", "in"):
            return _InSet(key, self.parse_set(), negated=True)
        if text.startswith("=", op_start):
            self.fail("expected '==', found '='")
        self.fail(f"expected an operator ({_OPERATORS_HELP}) after label {key!r}, found {self.found()}")

    def parse_string(self) -> str:
        quote = self.peek()
        if quote not in ("'", '"'):
            self.fail(f"expected a quoted string, found {self.found()}")
        opened = self.pos
        close = self.text.find(quote, opened + 1)
        if close < 0:
            self.fail(f"unterminated string (no closing {quote})", opened)
        self.pos = close + 1
        return self.text[opened + 1 : close]

    def parse_set(self) -> tuple[str, ...]:
        if self.peek() != "{":
            self.fail(f"expected '{{' to start a set of quoted strings, found {self.found()}")
        self.pos += 1
        members: set[str] = set()
        while self.peek() != "}":
            if self.peek() not in ("'", '"'):
                self.fail(f"expected a quoted string or '}}' in the set, found {self.found()}")
            members.add(self.parse_string())
            following = self.peek()
            if following == ",":
                self.pos += 1  # a trailing comma before '}' is accepted, as in Calico
            elif following != "}":
                self.fail(f"expected ',' or '}}' in the set, found {self.found()}")
        self.pos += 1
        return tuple(sorted(members))


@functools.lru_cache(maxsize=16384)
def parse(text: str) -> Selector:
    """Parse ``text`` (Calico's selector grammar); empty or blank text selects everything.

    Raises :class:`SelectorError` (a ``ValueError``) naming the problem and its position.
    """
    return Selector(_Parser(text).parse())
