"""YAML with a line number for every node, so every spec problem can name its line.

Why not `yaml.safe_load`: it returns plain dicts and lists and forgets where each value was
written, while invariant 5 promises the admin a message naming the file *and line* of every
problem, including the ones found long after parsing (a JSON Schema violation deep inside
``spec.mailboxes[2].aliases[0]``, an address claimed twice in two files). So we compose the
node graph ourselves (`yaml.compose_all`, which keeps each node's `start_mark`) and build the
plain Python value from it, recording on the way a map from every JSON path (the tuple
jsonschema reports as `error.absolute_path`) to the 1-based line of its node, and another to
the line of the mapping key that introduced it.

Three deliberate differences from PyYAML's safe loader, all for validation's sake:

* Timestamps stay strings. YAML 1.1 turns an unquoted ``2026-01-01T00:00:00Z`` into a
  `datetime`, which JSON Schema cannot type-check (it is not a JSON value) and whose naive
  form would lose the rule "a time without offset is in the window's time zone". The loader
  parses the text itself.
* Duplicate keys are an error. YAML says keys are unique; PyYAML silently keeps the last
  one, which hides exactly the kind of copy-paste mistake a reviewer misses.
* Keys must be scalars and are turned into strings, as JSON requires.
* Aliases are bounded. A composed node graph shares an anchored node between its aliases,
  so nine levels of ``&a [*a, *a, ...]`` are 666 bytes of text but 10^9 nodes once built
  (measured: 11.2 GB and no end). Every node built again through an alias counts against
  `Budget.alias_nodes` (10,000: far beyond what a spec shares, far below what hurts), and
  every node built at all against `Budget.nodes`, shared by every file of a spec set. The
  first node over a bound ends the file with a problem at its line, in milliseconds.

A syntax error does not lose the documents before it in a multi-document file: they are
returned together with the error, so the loader can still report their own problems.

PURE apart from taking text: no file access here (the loader reads files).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

JsonPath = tuple[str | int, ...]

_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_MAX_DEPTH = 100  # specs are shallow; this only stops alias cycles and pathological input
MAX_ALIAS_NODES = 10_000  # nodes built a second time through aliases, per spec set
MAX_NODES = 3_000_000  # nodes per spec set: 100,000 mailboxes are about 700,000


@dataclass
class Budget:
    """What is left to build for one spec set (shared by its files, so many small files
    cannot add up to what one big one may not be)."""

    nodes: int = field(default_factory=lambda: MAX_NODES)
    alias_nodes: int = field(default_factory=lambda: MAX_ALIAS_NODES)


class _OverBudget(Exception):
    """Internal: building stopped at `line` because a bound of `Budget` was reached."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _ScalarConstructor(SafeConstructor):
    """PyYAML's safe scalar conversions (ints, bools, nulls, floats), timestamps kept as text."""


# Register on the subclass only: PyYAML's constructor tables are class attributes.
_ScalarConstructor.add_constructor(_TIMESTAMP_TAG, lambda _c, node: node.value)


@dataclass
class YamlDocument:
    """One YAML document: its plain value and where each part of it was written."""

    data: Any
    line: int  # 1-based line where the document's root node starts
    lines: dict[JsonPath, int] = field(default_factory=dict)  # path -> line of the value
    key_lines: dict[JsonPath, int] = field(default_factory=dict)  # path -> line of its key
    problems: list[tuple[int, JsonPath, str]] = field(default_factory=list)  # (line, path, msg)
    # Set when plain mailbox entries were built without the lines inside them (`LEAN`):
    # gives this document again with every line, for the first question about one of them.
    complete: Callable[[], YamlDocument] | None = field(default=None, repr=False,
                                                        compare=False)

    def _fill(self) -> None:
        """Every line, from the fully built document (once; only on a line not recorded)."""
        assert self.complete is not None
        full, self.complete = self.complete(), None
        self.lines, self.key_lines = full.lines, full.key_lines

    def line_of(self, path: JsonPath) -> int:
        """Line of the node at `path`, or of its nearest recorded ancestor."""
        line = self.lines.get(path)  # the usual case, without slicing the path
        if line is not None:
            return line
        if self.complete is not None:
            self._fill()
            return self.line_of(path)
        for cut in range(len(path) - 1, -1, -1):
            line = self.lines.get(tuple(path[:cut]))
            if line is not None:
                return line
        return self.line

    def key_line_of(self, path: JsonPath) -> int:
        """Line of the key introducing `path` (falls back to the value's line)."""
        if tuple(path) not in self.key_lines and self.complete is not None:
            self._fill()
        return self.key_lines.get(tuple(path)) or self.line_of(path)


@dataclass
class YamlParseResult:
    """Every document parsed before the first syntax error, and that error if any."""

    documents: list[YamlDocument]
    error_line: int | None = None
    error: str | None = None
    over_budget: bool = False  # the error is a bound of `Budget`, not the YAML syntax


def _line(node: Node) -> int:
    """1-based line of a node (PyYAML marks are 0-based)."""
    return int(node.start_mark.line) + 1


class _Builder:
    """Walks one composed document, building the value and its line maps."""

    def __init__(self, doc: YamlDocument, budget: Budget, lean: bool = False) -> None:
        self.doc = doc
        self.budget = budget
        self.lean = lean  # build the plain entries of `LEAN` sequences without inner lines
        self.scalars = _ScalarConstructor()
        self.stack: list[int] = []  # ids of the collection nodes being built (alias cycles)
        self.built: set[int] = set()  # ids of the collection nodes built once already
        self.aliased = 0  # > 0 while building a collection a second time (through an alias)

    def spend(self, node: Node) -> None:
        """Count one node against the budget; _OverBudget at the first one too many."""
        self.budget.nodes -= 1
        if self.budget.nodes < 0:
            raise _OverBudget(_line(node), f"more than {MAX_NODES:,} YAML nodes in the spec "
                              "set (split it, or raise reconciler.spec.yamlpos.MAX_NODES)")
        if self.aliased:
            self.budget.alias_nodes -= 1
            if self.budget.alias_nodes < 0:
                raise _OverBudget(_line(node), f"YAML aliases expand to more than "
                                  f"{MAX_ALIAS_NODES:,} nodes (an alias bomb?); write the "
                                  "values out instead")

    def build(self, node: Node, path: JsonPath) -> Any:
        """The plain value of `node`, recording its line under `path`."""
        self.spend(node)
        self.doc.lines[path] = _line(node)
        if isinstance(node, ScalarNode):
            return self.scalar(node, path)
        if id(node) in self.stack or len(self.stack) >= _MAX_DEPTH:
            self.doc.problems.append((_line(node), path, "recursive or too deeply nested YAML"))
            return None
        again = id(node) in self.built
        self.built.add(id(node))
        self.aliased += again
        self.stack.append(id(node))
        try:
            if isinstance(node, SequenceNode):
                if self.lean and path == LEAN:
                    return [self.entry(item, (*path, i)) for i, item in enumerate(node.value)]
                return [self.text(item, (*path, i)) for i, item in enumerate(node.value)]
            if isinstance(node, MappingNode):
                return self.mapping(node, path)
            return None  # pragma: no cover - PyYAML has no other node kinds
        finally:
            self.stack.pop()
            self.aliased -= again

    def text(self, node: Node, path: JsonPath) -> Any:
        """`build`, with a short way for the most common node of a spec: a plain string
        (an address, a name) outside any alias. At 100,000 mailboxes a third of the nodes
        are such strings, and the calls `build` makes for each were a tenth of the load."""
        if type(node) is not ScalarNode or node.tag != _STR_TAG or self.aliased:
            return self.build(node, path)
        budget = self.budget
        budget.nodes -= 1
        if budget.nodes < 0:
            budget.nodes += 1
            self.spend(node)  # raises, naming the bound
        self.doc.lines[path] = node.start_mark.line + 1
        return node.value

    def entry(self, node: Node, path: JsonPath) -> Any:
        """One item of a `LEAN` sequence: a mapping of plain names to plain strings or lists
        of them (a mailbox entry, almost always) is built with its own line only, counting
        the same nodes against the budget; anything else exactly as `text` builds it."""
        built = self.built
        if type(node) is not MappingNode or self.aliased or id(node) in built:
            return self.text(node, path)
        result: dict[str, Any] = {}
        spent = 1
        lists: list[int] = []  # ids of the sequences built in here
        for key_node, value_node in node.value:
            if type(key_node) is not ScalarNode or key_node.tag != _STR_TAG \
                    or key_node.value in result:
                return self.text(node, path)
            kind = type(value_node)
            if kind is ScalarNode and value_node.tag == _STR_TAG:
                result[key_node.value] = value_node.value
                spent += 1
                continue
            if kind is not SequenceNode or id(value_node) in built:
                return self.text(node, path)
            texts = []
            for v in value_node.value:
                if type(v) is not ScalarNode or v.tag != _STR_TAG:
                    return self.text(node, path)
                texts.append(v.value)
            result[key_node.value] = texts
            spent += 1 + len(texts)
            lists.append(id(value_node))
        if self.budget.nodes < spent:
            return self.text(node, path)  # the bound is reached in here: say where
        self.budget.nodes -= spent
        built.add(id(node))
        if lists:
            built.update(lists)
        self.doc.lines[path] = node.start_mark.line + 1
        self.doc.complete = self.complete
        return result

    complete: Callable[[], YamlDocument] | None = None  # set by `parse_documents`

    def scalar(self, node: ScalarNode, path: JsonPath) -> Any:
        """A scalar converted like `yaml.safe_load` does, except timestamps."""
        if node.tag == _STR_TAG:  # most of a spec (addresses, names): the text as written
            return node.value
        try:
            return self.scalars.construct_object(node, deep=True)
        except yaml.YAMLError as exc:  # e.g. an unknown !tag
            self.doc.problems.append((_line(node), path, f"cannot read value: {exc}"))
            return node.value

    def mapping(self, node: MappingNode, path: JsonPath) -> dict[str, Any]:
        """A mapping with string keys; duplicate and non-scalar keys are reported."""
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
                self.doc.problems.append(
                    (_line(key_node), path, "mapping keys must be plain names (no '<<' merges)")
                )
                continue
            key = key_node.value if key_node.tag == _STR_TAG else str(self.scalar(key_node, path))
            child: JsonPath = (*path, key)
            if key in result:
                first = self.doc.key_lines.get(child, _line(node))
                self.doc.problems.append(
                    (_line(key_node), child, f"duplicate key '{key}' (first at line {first})")
                )
                continue
            self.doc.key_lines[child] = _line(key_node)
            result[key] = self.text(value_node, child)
        return result


# libyaml's parser (C) composes the same nodes with the same marks ~10x faster than PyYAML's
# pure-Python one: it is what keeps loading 100,000 mailbox entries to about a second.
_LOADER: type[yaml.SafeLoader] | Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _iter_nodes(text: str) -> Iterator[Node | None]:
    """`yaml.compose_all` over text, typed (libyaml when PyYAML was built with it)."""
    yield from yaml.compose_all(text, Loader=_LOADER)


# The sequence whose plain entries are built without the lines inside them: a spec set's
# bulk (100,000 mailbox entries are 85 % of its nodes) and, in a set that loads, no line in
# them is ever asked for but the entry's own (its location). A question about one (a
# problem to report) builds that document again with every line (`YamlDocument.complete`):
# the same messages, at the same lines, as if every line had been recorded.
LEAN: JsonPath = ("spec", "mailboxes")


def _document(text: str, index: int) -> YamlDocument:
    """Document `index` (counting the non-empty ones) of `text`, with every line."""
    return parse_documents(text, lean=False).documents[index]


def parse_documents(text: str, budget: Budget | None = None, *,
                    lean: bool = True) -> YamlParseResult:
    """Parse every document of a (multi-document) YAML text, keeping line numbers.

    Past a bound of `budget` (a fresh one when not given) the rest of the text is not read:
    the documents before stay, and `error` names the line and the bound. `lean=False`
    records the line of every node at once (see `LEAN`; the answers are the same)."""
    result = YamlParseResult(documents=[])
    budget = budget if budget is not None else Budget()
    try:
        for node in _iter_nodes(text):
            if node is None:  # an empty document (e.g. a file of comments, or a stray `---`)
                continue
            doc = YamlDocument(data=None, line=_line(node))
            builder = _Builder(doc, budget, lean)
            index = len(result.documents)
            builder.complete = lambda i=index: _document(text, i)
            doc.data = builder.build(node, ())
            result.documents.append(doc)
    except _OverBudget as exc:
        result.error_line = exc.line
        result.error = exc.message
        result.over_budget = True
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        result.error_line = int(mark.line) + 1 if mark is not None else 1
        result.error = " ".join(
            part for part in (exc.context, exc.problem) if part
        ) or str(exc)
    except yaml.YAMLError as exc:  # unmarked errors (e.g. a bad encoding) have no line
        result.error_line = 1
        result.error = str(exc)
    return result
