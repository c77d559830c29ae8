"""A recipe file checked as a file before its keys are parsed: UTF-8 text, not empty, each key once per mapping.

PyYAML alone lets the second of two equal keys win without a word: a value edited in one place and forgotten in
another would decide the run by its position in the file. Every recipe the harness reads goes through
:func:`check_recipe_file` (from :func:`.arguments.read_yaml`), so such a file is refused with both lines.

:class:`RecipeError`, the harness's error for a wrong recipe or override, lives here, at the bottom of the
recipe modules: arguments.py and everything above it import it from here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

_MERGE_TAG = "tag:yaml.org,2002:merge"


class RecipeError(ValueError):
    """A recipe or an override is wrong; the message says what and how to fix it."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that names a key twice (as YAML linters do)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:  # `<<: *defaults` may be overridden by the mapping's own keys
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # an unhashable key is PyYAML's own error to report
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise RecipeError(f"{self.name}:{line}: key {key!r} appears twice (first on line {first_line[key]}); "
                                  "the second would silently win: keep one")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def _unprintable(text: str) -> tuple[int, str] | None:
    """(line, character) of the first character PyYAML's reader refuses (a NUL, a BEL, ...), or None: PyYAML
    raises its ReaderError when the loader is made, before any line of it is parsed."""
    match = yaml.reader.Reader.NON_PRINTABLE.search(text)
    return None if match is None else (text.count("\n", 0, match.start()) + 1, match.group())


def check_recipe_file(path: str | os.PathLike) -> None:
    """Refuse, with a one-line RecipeError, a recipe that is not UTF-8 text, names a key twice in one mapping, or
    is empty. A missing file or bad YAML is left to :func:`.arguments.read_yaml`, which names those."""
    path = Path(path)
    if not path.is_file():
        return
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise RecipeError(f"recipe {path} is not UTF-8 text (byte {data[error.start]:#04x} on line {line}); save it "
                          "as UTF-8") from None
    if (unprintable := _unprintable(text)) is not None:
        line, char = unprintable
        raise RecipeError(f"recipe {path}: line {line} holds the control character {ord(char):#04x}, which YAML does "
                          "not allow in a file; remove it (a tab, a newline and a carriage return are fine)")
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)
    try:
        content = loader.get_single_data()
    except yaml.YAMLError:
        return
    finally:
        loader.dispose()
    if content is None or content == {}:
        raise RecipeError(f"recipe {path} is empty: it sets no key (a recipe needs at least model_name_or_path and "
                          "dataset_name)")
