"""Reading a YAML file: safe_load only, and every way it can fail as one NasError naming it.

The search space, an exported model's architecture.yaml and the values of `--set` are all
read here. What they hold is bounded before anything else looks at it: at most MAX_DEPTH
levels of nesting and MAX_VALUES values counted as every alias expands (a few lines of YAML
aliases can stand for billions of values, the "billion laughs"), so no later step recurses
or allocates without end. A key given twice in one mapping is refused, naming both lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from nas.core.errors import NasError

MAX_DEPTH = 32
MAX_VALUES = 100_000
MAX_FILE_BYTES = 10 * 2**20


def read_yaml(path: Path) -> Any:
    """The plain data (dicts, lists, scalars) in `path`; tags that build objects are refused."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise NasError(
                path,
                f"is larger than {MAX_FILE_BYTES // 2**20} MB: not a YAML file nas wrote or reads",
            )
        text = path.read_text()
    except FileNotFoundError:
        raise NasError(path, "file not found") from None
    except UnicodeDecodeError:
        raise NasError(path, "not valid YAML: not UTF-8 text") from None
    except OSError as err:
        raise NasError(path, f"cannot be read ({err.strerror})") from None
    return parse_yaml(text, path)


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load's loader, refusing a mapping that names a key twice (safe_load keeps the
    last value, so an edit further down would silently override the one a reader sees)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`, overridable
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = first_line.get(key)
            except TypeError:  # an unhashable key: the constructor below names it
                continue
            line = key_node.start_mark.line + 1
            if seen is not None:
                raise _DuplicateKey(f"duplicate key {key!r} on line {line} (first on line {seen})")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str | Path) -> Any:
    """The plain data in `text`; a NasError naming `source` where it is not valid YAML or
    names a key twice in one mapping."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only
    except _DuplicateKey as err:
        raise NasError(source, str(err)) from None
    except yaml.YAMLError as err:
        raise NasError(source, f"not valid YAML: {' '.join(str(err).split())}") from None
    except RecursionError:
        raise NasError(source, f"not valid YAML: nested deeper than {MAX_DEPTH} levels") from None
    _check_bounded(data, source)
    return data


def _check_bounded(data: Any, source: str | Path) -> None:
    """Walk `data` as a reader would, aliases expanded, without recursion; refuse it past
    MAX_DEPTH levels or MAX_VALUES values."""
    stack, seen = [(data, 1)], 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise NasError(source, f"holds more than {MAX_VALUES:,} values (aliases expanded)")
        if depth > MAX_DEPTH:
            raise NasError(source, f"is nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for pair in node.items() for v in pair)
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
