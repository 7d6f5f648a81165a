"""YAML as sensray reads it: safe tags only, bounded in size, and strict about duplicate keys.

    data = load(text)          # any problem is a SpecError naming the line

`yaml.safe_load` constructs no objects beyond plain data, but it still lets a small file
describe an astronomically large one: aliases ("billion laughs": nine references to a list
of nine references to ...) expand when anything walks the result (validation, `repr`, JSON),
a recursive anchor never ends, and deep nesting exhausts Python's stack. So the document is
composed first and measured as a graph: its size with every alias expanded is computed with
one memoised pass over the distinct nodes (never by expanding them), and must stay under
MAX_NODES; nesting under MAX_DEPTH. Composing stops as soon as either is passed as written (the
pure-Python parser is slow on a megabyte of tiny values). Only then is the data constructed.

A key given twice in one mapping is an error (PyYAML keeps the last one silently); keys that
a merge (`<<: *base`) brings in may still be overridden, as YAML intends.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from sensray.errors import SpecError

MAX_NODES = 50_000  # values, keys and containers, with aliases expanded (a spec is a page or two of YAML)
MAX_DEPTH = 64  # containers nested in containers, with aliases expanded
MAX_INT_CHARS = 64  # an integer literal's length (int64 takes 19 digits; binary literals take more)
MERGE_TAG = "tag:yaml.org,2002:merge"


def load(text: str) -> Any:
    """Parse one YAML document into plain data; every problem is a `SpecError` saying where."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SpecError("", f"not valid YAML: {where}{getattr(err, 'problem', None) or err}") from None
    finally:
        loader.dispose()


class _Loader(yaml.SafeLoader):
    depth = nodes = 0

    def compose_node(self, parent, index):
        # PyYAML composes recursively: stop deep nesting before Python's stack does.
        self.depth += 1
        self.nodes += 1
        try:
            if self.depth > MAX_DEPTH:
                raise SpecError("", f"{_line(self.peek_event())}nested deeper than {MAX_DEPTH} levels")
            if self.nodes > MAX_NODES:
                raise SpecError("", f"{_line(self.peek_event())}more than {MAX_NODES:,} values; a spec is a short "
                                    "file (for many values, draw them: randint, uniform, ...)")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            seen: dict[Any, Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # a list or mapping as a key: PyYAML's own error says so below
                    continue
                if first is not key_node:
                    raise SpecError("", f"{_line(key_node)}duplicate key {key!r} (first given on line "
                                        f"{first.start_mark.line + 1}); give each key once")
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node):
        # int64 needs 19 digits; Python refuses int() of thousands, and a long literal is a mistake anyway
        if len(node.value) > MAX_INT_CHARS:
            raise SpecError("", f"{_line(node)}an integer of {len(node.value)} characters; numbers in a spec fit "
                                "in 64 bits")
        return super().construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def _check_size(root: Node) -> None:
    """Size and depth of the document with aliases expanded, from one pass over its distinct nodes.

    Iterative (an explicit stack), memoised by node identity; a node met again while its own
    children are being measured is a recursive anchor.
    """
    measured: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, expanded depth)
    open_: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_.discard(key)
            kids = [measured[id(child)] for child in _children(node)]
            size = 1 + sum(s for s, _ in kids)
            depth = 1 + max((d for _, d in kids), default=0)
            if size > MAX_NODES:
                raise SpecError("", f"{_line(node)}expands to more than {MAX_NODES:,} values once its aliases "
                                    "are expanded (an alias bomb?); write the data out, or use fewer aliases")
            if depth > MAX_DEPTH:
                raise SpecError("", f"{_line(node)}nested deeper than {MAX_DEPTH} levels once its aliases are expanded")
            measured[key] = (size, depth)
        elif key not in measured:
            if key in open_:
                raise SpecError("", f"{_line(node)}an anchor refers to itself (a recursive structure has no end)")
            open_.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node))


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _line(where) -> str:
    mark = getattr(where, "start_mark", None)
    return f"line {mark.line + 1}: " if mark is not None else ""
