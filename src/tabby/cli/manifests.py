"""Reading manifests for tabbyctl: multi-document YAML or JSON, ``kind: List`` expanded.

Every failure is a ManifestError whose message is one line naming the source, the document
(1-based, counting from the top of the file) and, for syntax errors, the line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]


class ManifestError(ValueError):
    pass


def read_source(source: str) -> tuple[str, str]:
    """The text of ``source`` (a path, or ``-`` for stdin) and the name messages use for it."""
    if source == "-":
        return sys.stdin.read(), "<stdin>"
    try:
        return Path(source).read_text(), source
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"{source}: cannot read: {err}") from None


def _documents(text: str, name: str) -> list[Any]:
    if text.lstrip().startswith(("{", "[")):
        try:
            doc = json.loads(text)
            return doc if isinstance(doc, list) else [doc]
        except json.JSONDecodeError:
            pass  # maybe YAML flow style; let the YAML parser report
    docs: list[Any] = []
    try:
        for doc in yaml.safe_load_all(text):
            docs.append(doc)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ManifestError(f"{name}: document {len(docs) + 1}{line}: {problem}") from None
    return docs


def _expand(doc: Any, where: str) -> list[Obj]:
    if not isinstance(doc, dict):
        raise ManifestError(f"{where}: expected a mapping (an object), got {type(doc).__name__}")
    if doc.get("kind") != "List":
        return [doc]
    items = doc.get("items")
    if not isinstance(items, list):
        raise ManifestError(f"{where}: a List needs items: [...]")
    out = []
    for i, item in enumerate(items):
        out.extend(_expand(item, f"{where} items[{i}]"))
    return out


def load_manifests(source: str) -> list[Obj]:
    """Every object in ``source``, in order; empty documents are skipped."""
    text, name = read_source(source)
    objs: list[Obj] = []
    for i, doc in enumerate(_documents(text, name), 1):
        if doc is not None:
            objs.extend(_expand(doc, f"{name}: document {i}"))
    if not objs:
        raise ManifestError(f"{name}: no objects found")
    return objs
