"""loopd.yamlfile: the documents ``compose`` builds are the ones PyYAML's constructor
builds from the same node tree (its own walk is only faster), YAML 1.2 booleans."""

from __future__ import annotations

import pytest
import yaml

from loopd import yamlfile

DOCUMENTS = [
    "rules:\n  - {name: a, on: {source: s}, if: 'x > 1'}\n  - name: b\n    key: '{{ k }}'\n",
    "ints: [1, -2, 0x1F, 0o17, 1_000, +3]\nfloats: [1.5, -0.25, 1e3, .inf, -.inf]\n",
    "nulls: [~, null, Null, '']\nempty:\nbools: [true, False, on, off, yes, no]\n",
    "when: 2026-11-23\nat: 2026-11-23T03:00:00Z\nquoted: '2026-11-23'\nn: '007'\n",
    "base: &b {a: 1, b: [x, y]}\nsame: *b\nlist: &l [1, 2]\nagain: [*l, *l]\n",
    "base: &b {a: 1, b: 2}\nmerged: {<<: *b, b: 3, c: 4}\n",
    "tagged: !!set {a, b}\nraw: !!binary aGVsbG8=\nstr: !!str 12\n",
    "dup: 1\ndup: 2\n1: int key\n2.5: float key\nnull: null key\n",
    "nested: [[1, [2, [3, {deep: [4]}]]]]\ntext: |\n  two\n  lines\n",
    "- plain\n- 'single'\n- \"double \\u00e9 \\U0001F692\"\n",
    "=: 1\na: {=: 1}\nb:\n  - =: x\n",
    "big: 123456789012345678901234567890\nneg: -0.0\nhex: 0xff\nsexa: 1:30\n",
]


@pytest.mark.parametrize("text", DOCUMENTS)
def test_compose_builds_what_pyyaml_builds(text: str) -> None:
    data, node = yamlfile.compose(text)
    expected = yamlfile.load(text)  # PyYAML's constructor, with the same Loader
    assert data == expected
    assert type(data) is type(expected)
    assert node is not None


def test_an_alias_is_the_same_object_and_a_merge_key_merges() -> None:
    data, _ = yamlfile.compose(DOCUMENTS[4])
    assert data["same"] is data["base"] and data["again"][0] is data["again"][1]
    merged, _ = yamlfile.compose(DOCUMENTS[5])
    assert merged["merged"] == {"a": 1, "b": 3, "c": 4}


def test_on_and_off_stay_strings() -> None:
    data, _ = yamlfile.compose("on: {source: s}\nflags: [on, off, yes, no, true]\n")
    assert data == {"on": {"source": "s"}, "flags": ["on", "off", "yes", "no", True]}


def test_a_recursive_alias_is_built_as_pyyaml_builds_it() -> None:
    data, _ = yamlfile.compose("a: &a\n  self: *a\n  n: 1\n")
    assert data["a"]["self"] is data["a"] and data["a"]["n"] == 1


def test_an_unhashable_key_is_pyyamls_error() -> None:
    with pytest.raises(yaml.constructor.ConstructorError, match="unhashable"):
        yamlfile.compose("? [a, b]\n: value\n")
    with pytest.raises(yaml.constructor.ConstructorError, match="unhashable"):
        yamlfile.compose("? {a: 1}\n: value\n")


@pytest.mark.parametrize("text", [
    "a: !!seq foo\n", "a: !!map foo\n", "a: !!set foo\n", "a: !!omap foo\n",
    "a: !!pairs foo\n", "? !!map foo\n: 1\n", "rules: !!seq nope\n", "a: !unknown x\n",
])
def test_what_pyyaml_refuses_is_refused_with_its_error(text: str) -> None:
    with pytest.raises(yaml.YAMLError) as expected:
        yamlfile.load(text)
    with pytest.raises(yaml.YAMLError) as got:
        yamlfile.compose(text)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize(("text", "line", "problem"), [
    ("a: 1\nb: !!int x\n", 2, "'x' is not a valid !!int"),
    ("a:\n  - !!float nope\n", 2, "'nope' is not a valid !!float"),
    ("when: !!timestamp 2026-13-45\n", 1, "'2026-13-45' is not a valid !!timestamp"),
    ("a: !!bool maybe\n", 1, "'maybe' is not a valid !!bool"),
    # the same scalar under a merge key, which leaves the document to PyYAML
    ("base: &b {n: 1}\nm: {<<: *b, bad: !!int y}\n", 2, "'y' is not a valid !!int"),
])
def test_a_scalar_its_tag_cannot_read_is_a_yaml_error_at_its_line(
        text: str, line: int, problem: str) -> None:
    """``!!int x`` made PyYAML raise a bare ValueError (or KeyError for ``!!bool``), which
    no loader catches: ``loopd check`` ended in a traceback. It is a YAML error at the
    scalar's line, reported like a syntax error."""
    with pytest.raises(yaml.YAMLError) as info:
        yamlfile.compose(text)
    where, message = yamlfile.error_where(info.value, "r.yaml")
    assert (where, message) == (f"r.yaml:{line}", f"invalid YAML: {problem}")
