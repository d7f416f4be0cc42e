"""Tests of the selector grammar: every operator, precedence, canonical form, errors, properties.

The property tests build random expressions as small tuples, render them to text in randomly chosen
styles (whitespace, quotes, redundant parentheses) and compare ``evaluate`` with an independent
reference evaluator written here.
"""

from __future__ import annotations

import copy
import hashlib
import pickle
import sys
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calyx.selector import MAX_DEPTH, MAX_KEY_LENGTH, Selector, SelectorError, parse

pytestmark = pytest.mark.unit

WEB = {"app": "web", "tier": "frontend", "projectcalico.org/namespace": "default"}

# --- every operator against label sets ---------------------------------------------------------

EVALUATE_CASES: list[tuple[str, dict[str, str], bool]] = [
    # all() and the empty selector
    ("all()", {}, True),
    ("all()", WEB, True),
    ("", {}, True),
    ("   \t\n ", WEB, True),
    ("!all()", WEB, False),
    # has / !has
    ("has(app)", WEB, True),
    ("has(app)", {}, False),
    ("has(app)", {"app": ""}, True),
    ("!has(app)", WEB, False),
    ("!has(app)", {"other": "x"}, True),
    ("has(projectcalico.org/namespace)", WEB, True),
    ("has( app )", WEB, True),
    ("has (app)", WEB, True),
    # ==
    ("app == 'web'", WEB, True),
    ("app == 'db'", WEB, False),
    ("app == 'web'", {}, False),
    ("app == ''", {"app": ""}, True),
    ("app == ''", {}, False),
    ("projectcalico.org/namespace == 'default'", WEB, True),
    # != is true when the label is absent
    ("app != 'db'", WEB, True),
    ("app != 'web'", WEB, False),
    ("app != 'web'", {}, True),
    ("app != ''", {"app": ""}, False),
    # in / not in
    ("tier in {'frontend', 'backend'}", WEB, True),
    ("tier in {'backend'}", WEB, False),
    ("tier in {'frontend'}", {}, False),
    ("tier in {}", WEB, False),
    ("tier in {}", {}, False),
    ("tier not in {'backend'}", WEB, True),
    ("tier not in {'frontend', 'backend'}", WEB, False),
    ("tier not in {'frontend'}", {}, True),
    ("tier not in {}", {}, True),
    ("tier not in {}", WEB, True),
    ("tier in {'frontend',}", WEB, True),
    ("tier in {''}", {"tier": ""}, True),
    # contains / starts with / ends with (all false when absent)
    ("tier contains 'ont'", WEB, True),
    ("tier contains 'back'", WEB, False),
    ("tier contains ''", WEB, True),
    ("tier contains ''", {}, False),
    ("tier contains 'x'", {}, False),
    ("tier starts with 'front'", WEB, True),
    ("tier starts with 'end'", WEB, False),
    ("tier starts with ''", {}, False),
    ("tier ends with 'end'", WEB, True),
    ("tier ends with 'front'", WEB, False),
    ("tier ends with 'end'", {}, False),
    ("tier startswith 'front'", WEB, True),  # Calico allows no space between the words
    ("tier  starts \t with 'front'", WEB, True),
    # negation of operations
    ("!app == 'web'", WEB, False),
    ("!app == 'web'", {}, True),
    ("!tier contains 'x'", {}, True),
    ("!tier contains 'ont'", WEB, False),
    ("!!has(app)", WEB, True),
    ("!!!has(app)", WEB, False),
    ("! ! has(app)", WEB, True),
    # && and ||
    ("app == 'web' && tier == 'frontend'", WEB, True),
    ("app == 'web' && tier == 'backend'", WEB, False),
    ("app == 'db' || tier == 'frontend'", WEB, True),
    ("app == 'db' || tier == 'backend'", WEB, False),
    ("has(a) && has(b) && has(c)", {"a": "", "b": "", "c": ""}, True),
    ("has(a) && has(b) && has(c)", {"a": "", "b": ""}, False),
    ("has(a) || has(b) || has(c)", {"c": ""}, True),
    ("has(a) || has(b) || has(c)", {"d": ""}, False),
    # precedence: ! over &&, && over ||
    ("has(a) || has(b) && has(c)", {"a": ""}, True),  # a || (b && c)
    ("(has(a) || has(b)) && has(c)", {"a": ""}, False),
    ("has(a) && has(b) || has(c)", {"c": ""}, True),  # (a && b) || c
    ("has(a) && (has(b) || has(c))", {"c": ""}, False),
    ("!has(a) && has(b)", {"b": ""}, True),  # (!a) && b
    ("!(has(a) && has(b))", {"b": ""}, True),
    ("!has(a) || has(b)", {"a": ""}, False),
    ("!(has(a) || has(b))", {"b": ""}, False),
    ("!(has(a) || has(b))", {}, True),
    # parentheses and whitespace
    ("((app == 'web'))", WEB, True),
    ("(app=='web')&&(tier=='frontend')", WEB, True),
    ("app\t==\n'web'", WEB, True),
    ("!(app == 'web')", WEB, False),
    # quoting
    ('app == "web"', WEB, True),
    ("name == \"it's\"", {"name": "it's"}, True),
    ("name == 'say \"hi\"'", {"name": 'say "hi"'}, True),
    ("name == 'a b && c || (d)'", {"name": "a b && c || (d)"}, True),
    ("name == 'ü'", {"name": "ü"}, True),
    ("name in {\"it's\", 'x'}", {"name": "it's"}, True),
    # label keys that look like keywords
    ("in == 'x'", {"in": "x"}, True),
    ("not not in {'x'}", {"not": "y"}, True),
    ("contains contains 'x'", {"contains": "axb"}, True),
    ("all == 'x'", {"all": "x"}, True),
    ("has == 'x'", {"has": "x"}, True),
    ("-1.a_b/c == 'x'", {"-1.a_b/c": "x"}, True),
]


@pytest.mark.parametrize(("text", "labels", "expected"), EVALUATE_CASES)
def test_evaluate(text: str, labels: dict[str, str], expected: bool) -> None:
    assert parse(text).evaluate(labels) is expected


def test_evaluate_accepts_any_mapping() -> None:
    sel = parse("app == 'web' && tier != 'db' && has(projectcalico.org/namespace)")
    assert sel.evaluate(MappingProxyType(WEB)) is True
    assert sel.evaluate(MappingProxyType({})) is False


CANONICAL_CASES: list[tuple[str, str]] = [
    ("", "all()"),
    ("  ", "all()"),
    ("all( )", "all()"),
    ("has( app )", "has(app)"),
    ('app=="web"', "app == 'web'"),
    ("name == \"it's\"", "name == \"it's\""),
    ("((app == 'web'))", "app == 'web'"),
    ("!!has(a)", "has(a)"),
    ("!(a == 'x')", "a != 'x'"),
    ("!a != 'x'", "a == 'x'"),
    ("!(a in {'x'})", "a not in {'x'}"),
    ("!a not in {'x'}", "a in {'x'}"),
    ("!(a contains 'x')", "!(a contains 'x')"),
    ("!has(a)", "!has(a)"),
    ("!(has(a))", "!has(a)"),
    ("a in {'y', \"x\", 'y',}", "a in {'x', 'y'}"),
    ("a not in { }", "a not in {}"),
    ("has(a) && (has(b) && has(c))", "has(a) && has(b) && has(c)"),
    ("(has(a) || has(b)) || has(c)", "has(a) || has(b) || has(c)"),
    ("(has(a) && has(b)) || has(c)", "has(a) && has(b) || has(c)"),
    ("(has(a) || has(b)) && has(c)", "(has(a) || has(b)) && has(c)"),
    ("!(has(a) && has(b))", "!(has(a) && has(b))"),
    ("a startswith 'x'", "a starts with 'x'"),
    ("a ends   with 'x'", "a ends with 'x'"),
]


@pytest.mark.parametrize(("text", "canonical"), CANONICAL_CASES)
def test_canonical(text: str, canonical: str) -> None:
    sel = parse(text)
    assert sel.canonical == canonical
    assert str(sel) == canonical
    assert parse(canonical) == sel
    assert parse(canonical).canonical == canonical


def test_unique_id_is_pinned() -> None:
    # ipsets are named from this id: it must never change between releases or Python versions.
    sel = parse("app == 'web'")
    assert sel.unique_id == "50e2d6f2667fbd1b"
    assert sel.unique_id == hashlib.sha256(b"app == 'web'").hexdigest()[:16]
    assert parse("").unique_id == hashlib.sha256(b"all()").hexdigest()[:16]


def test_unique_id_survives_lone_surrogates() -> None:
    sel = parse("a == '\ud800'")
    assert len(sel.unique_id) == 16
    assert sel.evaluate({"a": "\ud800"}) is True


@pytest.mark.parametrize(
    ("text", "keys"),
    [
        ("", set()),
        ("all()", set()),
        ("has(a)", {"a"}),
        ("!has(a) && b == 'x' || (c in {} && !(d contains 'y')) || e starts with 'z' || f ends with ''",
         {"a", "b", "c", "d", "e", "f"}),
        ("a == 'x' && a != 'y'", {"a"}),
    ],
)
def test_label_keys(text: str, keys: set[str]) -> None:
    assert parse(text).label_keys == frozenset(keys)


def test_selector_value_semantics() -> None:
    a = parse("app == 'web' && has(x)")
    b = parse('(app=="web")&&has( x )')
    c = parse("has(x) && app == 'web'")
    assert a == b
    assert hash(a) == hash(b)
    assert a.unique_id == b.unique_id
    assert a != c  # operand order is kept: it is evaluation order
    assert len({a, b, c}) == 2
    assert a != "app == 'web' && has(x)"
    assert repr(a) == "Selector(\"app == 'web' && has(x)\")"


def test_selector_is_immutable() -> None:
    sel = parse("has(a)")
    with pytest.raises(AttributeError):
        sel.canonical = "all()"
    with pytest.raises(AttributeError):
        del sel.unique_id
    with pytest.raises(AttributeError):
        sel.extra = 1
    assert sel.canonical == "has(a)"


def test_parse_is_cached() -> None:
    assert parse("app == 'cached'") is parse("app == 'cached'")


def test_pickle_and_copy() -> None:
    sel = parse("a in {'x', 'y'} || !has(b)")
    for clone in (pickle.loads(pickle.dumps(sel)), copy.deepcopy(sel), copy.copy(sel)):
        assert clone == sel
        assert clone.evaluate({"a": "x"}) is True
        assert clone.evaluate({"b": "1"}) is False
    err = SelectorError("boom", "has(", 4)
    clone_err = pickle.loads(pickle.dumps(err))
    assert (clone_err.reason, clone_err.text, clone_err.position) == ("boom", "has(", 4)
    assert str(clone_err) == str(err)


# --- errors ------------------------------------------------------------------------------------

ERROR_CASES: list[tuple[str, int, str]] = [
    # unbalanced parentheses
    ("(has(a)", 7, "expected ')' to close the '(' at position 0"),
    ("app == 'a' && (", 15, "expected a label key"),
    ("has(a))", 6, "unbalanced ')'"),
    (")", 0, "expected a label key"),
    ("()", 1, "expected an expression inside '()'"),
    ("((has(a))", 9, "expected ')'"),
    # unterminated strings
    ("app == 'web", 7, "unterminated string"),
    ('app == "web', 7, "unterminated string"),
    ("a in {'x', 'y}", 11, "unterminated string"),
    # unknown or malformed operators
    ("app = 'web'", 4, "expected '=='"),
    ("app === 'web'", 6, "expected a quoted string"),
    ("app ~= 'web'", 4, "expected an operator"),
    ("app like 'web'", 4, "expected an operator"),
    ("app inx {'a'}", 4, "expected an operator"),
    ("app starts 'w'", 4, "expected an operator"),
    ("app not {'a'}", 4, "expected an operator"),
    ("app", 3, "expected an operator"),
    ("has(a) & has(b)", 7, "expected '&&'"),
    ("has(a) | has(b)", 7, "expected '||'"),
    ("has(a) &&", 9, "expected a label key"),
    ("|| has(a)", 0, "expected a label key"),
    ("!= 'a'", 0, "expected an expression before '!='"),
    ("global()", 0, "unknown function 'global()'"),
    ("foo (a)", 0, "unknown function 'foo()'"),
    ("all(a)", 4, "expected ')' after 'all('"),
    # values must be quoted strings; sets must be sets
    ("app == web", 7, "expected a quoted string"),
    ("app == ", 7, "expected a quoted string"),
    ("app in 'a'", 7, "expected '{'"),
    ("app in {a}", 8, "expected a quoted string or '}'"),
    ("app in {'a' 'b'}", 12, "expected ',' or '}'"),
    ("app in {'a',,}", 12, "expected a quoted string or '}'"),
    ("app in {'a'", 11, "expected ',' or '}'"),
    # trailing garbage
    ("has(a) has(b)", 7, "expected '&&', '||' or the end"),
    ("app == 'a' 'b'", 11, "expected '&&', '||' or the end"),
    ("all() x", 6, "expected '&&', '||' or the end"),
    # bad label keys
    ("$app == 'x'", 0, "expected a label key"),
    ("app:x == 'y'", 3, "expected an operator"),
    ("has()", 4, "expected a label key in has()"),
    ("has('a')", 4, "expected a label key in has()"),
    ("has(a b)", 6, "expected ')' after the label key"),
    ("has(a", 5, "expected ')' after the label key"),
    ("'a' == 'b'", 0, "expected a label key"),
    ("k" * (MAX_KEY_LENGTH + 1) + " == 'x'", 0, "label key longer than 512"),
    (f"has({'k' * (MAX_KEY_LENGTH + 1)})", 4, "label key longer than 512"),
    ("é == 'x'", 0, "expected a label key"),
    # too deep
    ("(" * (MAX_DEPTH + 1) + "has(a)" + ")" * (MAX_DEPTH + 1), MAX_DEPTH, "nested deeper than 100"),
    ("(" * 5000, MAX_DEPTH, "nested deeper than 100"),
    ("!(" * 5000, 2 * MAX_DEPTH + 1, "nested deeper than 100"),
]


@pytest.mark.parametrize(("text", "position", "reason"), ERROR_CASES)
def test_errors(text: str, position: int, reason: str) -> None:
    with pytest.raises(SelectorError) as info:
        parse(text)
    err = info.value
    assert isinstance(err, ValueError)
    assert reason in err.reason
    assert err.position == position
    assert err.text == text
    assert f"at position {position} in " in str(err)


def test_error_message_format() -> None:
    with pytest.raises(SelectorError) as info:
        parse("app == 'a' && (has(b)")
    assert str(info.value) == (
        "expected ')' to close the '(' at position 14, found end of selector at position 21 "
        "in \"app == 'a' && (has(b)\""
    )


def test_long_selector_error_shows_an_excerpt() -> None:
    text = " && ".join(f"has(k{i})" for i in range(200)) + " && ?"
    with pytest.raises(SelectorError) as info:
        parse(text)
    message = str(info.value)
    assert info.value.position == len(text) - 1
    assert len(message) < 400
    assert "'?'" in message


def test_maximum_depth_is_accepted_and_evaluates() -> None:
    text = "(" * MAX_DEPTH + "has(a)" + ")" * MAX_DEPTH
    assert parse(text).canonical == "has(a)"
    # Depth that survives canonicalisation: alternate && and || through every level.
    nested = "has(z)"
    for i in range(MAX_DEPTH):
        nested = f"!(has(k{i}) {'&&' if i % 2 else '||'} {nested})"
    sel = parse(nested)
    assert parse(sel.canonical) == sel
    assert sel.canonical.count("!(") == MAX_DEPTH

    def expected(labels: dict[str, str]) -> bool:
        value = "z" in labels
        for i in range(MAX_DEPTH):
            present = f"k{i}" in labels
            value = not (present and value) if i % 2 else not (present or value)
        return value

    odd = {f"k{i}": "" for i in range(1, MAX_DEPTH, 2)}
    label_sets = [{}, {"z": ""}, {"k99": ""}, odd, {**odd, "z": ""}, {**odd, "k50": ""}]
    assert {expected(labels) for labels in label_sets} == {True, False}
    for labels in label_sets:
        assert sel.evaluate(labels) is expected(labels)


def test_wide_selectors_do_not_recurse() -> None:
    count = 5 * sys.getrecursionlimit()
    sel = parse(" && ".join(f"has(k{i})" for i in range(count)))
    assert sel.evaluate({f"k{i}": "" for i in range(count)}) is True
    assert sel.evaluate({}) is False
    sel = parse(" || ".join(f"k{i} == 'v'" for i in range(count)))
    assert sel.evaluate({f"k{count - 1}": "v"}) is True
    assert parse("!" * count + "has(a)").evaluate({"a": ""}) is (count % 2 == 0)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=60))
def test_arbitrary_text_parses_or_raises_selector_error(text: str) -> None:
    _parses_or_raises_selector_error(text)


SYNTAX_PIECES = [
    "a", "b", "app", "x.y/z", " ", "\t", "(", ")", "{", "}", ",", "'", '"', "'v'", '"w"', "!", "==",
    "!=", "=", "&&", "||", "&", "|", "in", "not", "not in", "contains", "starts", "with", "ends",
    "has(", "all()", "has(a)", "global()", "$",
]


@settings(max_examples=600, deadline=None)
@given(st.lists(st.sampled_from(SYNTAX_PIECES), max_size=20).map(" ".join))
def test_near_miss_syntax_parses_or_raises_selector_error(text: str) -> None:
    _parses_or_raises_selector_error(text)


def _parses_or_raises_selector_error(text: str) -> None:
    try:
        sel = parse(text)
    except SelectorError as err:
        assert 0 <= err.position <= len(text)
        assert f"at position {err.position}" in str(err)
        return
    assert isinstance(sel, Selector)
    assert parse(sel.canonical) == sel
    assert isinstance(sel.evaluate({"a": "v", "app": "w"}), bool)


# --- property tests against a reference evaluator ----------------------------------------------

Expr = tuple[Any, ...]
KEYS = ["a", "b", "app", "x.y/z-1"]
VALUE_ALPHABET = "xy'\" "
values = st.text(alphabet=VALUE_ALPHABET, max_size=3).filter(lambda v: not ("'" in v and '"' in v))
label_sets = st.dictionaries(st.sampled_from(KEYS), st.text(alphabet=VALUE_ALPHABET, max_size=3), max_size=4)
COMPARE_OPS = ["==", "!=", "contains", "starts with", "ends with"]

leaves: st.SearchStrategy[Expr] = st.one_of(
    st.just(("all",)),
    st.tuples(st.just("has"), st.sampled_from(KEYS)),
    st.tuples(st.just("cmp"), st.sampled_from(KEYS), st.sampled_from(COMPARE_OPS), values),
    st.tuples(st.just("in"), st.sampled_from(KEYS), st.lists(values, max_size=3), st.booleans()),
)


def _extend(children: st.SearchStrategy[Expr]) -> st.SearchStrategy[Expr]:
    return st.one_of(
        st.tuples(st.just("not"), children),
        st.tuples(st.sampled_from(["and", "or"]), children, children),
    )


exprs: st.SearchStrategy[Expr] = st.recursive(leaves, _extend, max_leaves=8)


def reference(expr: Expr, labels: Mapping[str, str]) -> bool:
    """Calico's semantics, written out independently of the implementation under test."""
    kind = expr[0]
    if kind == "all":
        return True
    if kind == "has":
        return expr[1] in labels
    if kind == "cmp":
        key: str
        op: str
        value: str
        _, key, op, value = expr
        if key not in labels:
            return op == "!="
        actual = labels[key]
        checks: dict[str, Callable[[], bool]] = {
            "==": lambda: actual == value,
            "!=": lambda: actual != value,
            "contains": lambda: value in actual,
            "starts with": lambda: actual.startswith(value),
            "ends with": lambda: actual.endswith(value),
        }
        return checks[op]()
    if kind == "in":
        _, key, members, negated = expr
        found = key in labels and labels[key] in members
        return not found if negated else found
    if kind == "not":
        return not reference(expr[1], labels)
    if kind == "and":
        return reference(expr[1], labels) and reference(expr[2], labels)
    return reference(expr[1], labels) or reference(expr[2], labels)


class Renderer:
    """Writes an expression as selector text, drawing every stylistic choice from hypothesis."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def ws(self, required: bool = False) -> str:
        choices = [" ", "  ", "\t", "\n", " \t "] if required else ["", " ", "  ", "\t", "\n"]
        return self.data.draw(st.sampled_from(choices))

    def quote(self, value: str) -> str:
        if "'" in value:
            return f'"{value}"'
        if '"' in value:
            return f"'{value}'"
        q = self.data.draw(st.sampled_from(["'", '"']))
        return f"{q}{value}{q}"

    def maybe_parens(self, text: str) -> str:
        if self.data.draw(st.integers(0, 4)) == 0:
            return f"({self.ws()}{text}{self.ws()})"
        return text

    def render(self, expr: Expr) -> str:
        kind = expr[0]
        w = self.ws
        if kind == "all":
            text = f"all({w()})"
        elif kind == "has":
            text = f"has({w()}{expr[1]}{w()})"
        elif kind == "cmp":
            _, key, op, value = expr
            gap = w(required=True) if op[0].isalpha() else w()
            op_text = op.replace(" ", w(required=True))
            text = f"{key}{gap}{op_text}{w()}{self.quote(value)}"
        elif kind == "in":
            _, key, members, negated = expr
            op = f"not{w(required=True)}in" if negated else "in"
            body = f"{w()},{w()}".join(self.quote(m) for m in members)
            trailing = "," if members and self.data.draw(st.booleans()) else ""
            text = f"{key}{w(required=True)}{op}{w()}{{{w()}{body}{trailing}{w()}}}"
        elif kind == "not":
            inner = self.render(expr[1])
            if expr[1][0] in ("and", "or") or self.data.draw(st.booleans()):
                inner = f"({w()}{inner}{w()})"
            text = f"!{w()}{inner}"
        else:
            op = "&&" if kind == "and" else "||"
            parts = []
            for child in expr[1:]:
                part = self.render(child)
                if kind == "and" and child[0] == "or":
                    part = f"({part})"
                parts.append(part)
            text = f"{parts[0]}{w()}{op}{w()}{parts[1]}"
        return self.maybe_parens(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exprs, st.lists(label_sets, min_size=1, max_size=6), st.data())
def test_evaluate_agrees_with_reference(expr: Expr, label_list: list[dict[str, str]], data: st.DataObject) -> None:
    text = Renderer(data).render(expr)
    sel = parse(text)
    again = parse(sel.canonical)
    for labels in label_list:
        expected = reference(expr, labels)
        assert sel.evaluate(labels) is expected, (text, labels)
        assert again.evaluate(labels) is expected, (sel.canonical, labels)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exprs, st.data())
def test_canonical_roundtrip_and_style_independence(expr: Expr, data: st.DataObject) -> None:
    first = parse(Renderer(data).render(expr))
    second = parse(Renderer(data).render(expr))
    assert first == second
    assert first.unique_id == second.unique_id
    assert len(first.unique_id) == 16
    assert int(first.unique_id, 16) >= 0
    again = parse(first.canonical)
    assert again == first
    assert again.canonical == first.canonical
    assert again.unique_id == first.unique_id
    assert again.label_keys == first.label_keys


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exprs, exprs, st.lists(label_sets, min_size=1, max_size=6), st.data())
def test_de_morgan(a: Expr, b: Expr, label_list: list[dict[str, str]], data: st.DataObject) -> None:
    renderer = Renderer(data)
    a_text, b_text = renderer.render(a), renderer.render(b)
    not_and = parse(f"!(({a_text}) && ({b_text}))")
    or_not = parse(f"!({a_text}) || !({b_text})")
    not_or = parse(f"!(({a_text}) || ({b_text}))")
    and_not = parse(f"!({a_text}) && !({b_text})")
    for labels in label_list:
        assert not_and.evaluate(labels) is or_not.evaluate(labels)
        assert not_or.evaluate(labels) is and_not.evaluate(labels)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), leaves), min_size=1, max_size=6),
    st.lists(st.sampled_from(["&&", "||"]), min_size=5, max_size=5),
    st.lists(label_sets, min_size=1, max_size=6),
    st.data(),
)
def test_precedence_without_parentheses(
    terms: list[tuple[bool, Expr]], ops: list[str], label_list: list[dict[str, str]], data: st.DataObject
) -> None:
    # "!t1 && t2 || t3 && !t4" must mean "((!t1) && t2) || (t3 && (!t4))".
    renderer = Renderer(data)
    pieces = []
    for index, (negated, term) in enumerate(terms):
        text = renderer.render(term)
        if index:
            pieces.append(ops[index - 1])
        pieces.append(f"!{text}" if negated else text)
    sel = parse(" ".join(pieces))
    for labels in label_list:
        groups: list[list[bool]] = [[]]
        for index, (negated, term) in enumerate(terms):
            if index and ops[index - 1] == "||":
                groups.append([])
            groups[-1].append(reference(term, labels) != negated)
        assert sel.evaluate(labels) is any(all(group) for group in groups), (pieces, labels)
