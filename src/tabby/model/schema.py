"""A small declarative schema: checkers that validate a value at a path and return it normalised.

A checker is ``(value, path) -> normalised value`` and raises FieldError naming the path.
``Struct`` is the workhorse: unknown keys are errors (unless ``open``), ``None`` counts as absent
(as in Kubernetes), defaults fill absent fields in declaration order (a callable default sees
the fields built so far; a default is itself checked, so nested defaults apply), and ``post``
runs cross-field checks on the result.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any

from tabby.model.errors import FieldError

Check = Callable[[Any, str], Any]
Post = Callable[[dict[str, Any], str], dict[str, Any]]

_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


def at(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def key_of(path: str, key: str) -> str:
    """The path of a map entry: ``metadata.labels["app"]`` (keys may hold dots)."""
    return f'{path}["{key}"]'


def item(path: str, index: int) -> str:
    return f"{path}[{index}]"


def string(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise FieldError(path, "must be a string")
    return value


def boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise FieldError(path, "must be a boolean (true or false)")
    return value


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    if lo is not None and hi is not None:
        want = f"an integer {lo}-{hi}"
    elif lo is not None:
        want = f"an integer >= {lo}"
    else:
        want = "an integer"

    def check(value: Any, path: str) -> int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise FieldError(path, f"must be {want}")
        return int(value)

    return check


port = integer(1, 65535)


def enum(*values: str) -> Check:
    def check(value: Any, path: str) -> str:
        if value not in values:
            raise FieldError(path, f"must be one of {'|'.join(values)}, got {value!r}")
        return str(value)

    return check


protocol = enum("TCP", "UDP", "SCTP")


def ip(value: Any, path: str) -> str:
    try:
        return str(ipaddress.ip_address(string(value, path)))
    except ValueError:
        raise FieldError(path, f"{value!r} is not a valid IP address") from None


def cidr(value: Any, path: str) -> str:
    """A CIDR, normalised to its network address (host bits cleared)."""
    try:
        return str(ipaddress.ip_network(string(value, path), strict=False))
    except ValueError:
        raise FieldError(path, f"{value!r} is not a valid CIDR") from None


def int_or_name(value: Any, path: str) -> int | str:
    """A port number 1-65535 or an IANA service name (as Kubernetes targetPort)."""
    if isinstance(value, str):
        if value.isdigit():
            return int(port(int(value), path))
        bad = not _SVC_NAME.match(value) or "--" in value or not re.search("[a-z]", value)
        if len(value) > 15 or bad:  # IANA_SVC_NAME, as Kubernetes checks it
            raise FieldError(path, f"{value!r} is not a valid port name")
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return int(port(value, path))
    raise FieldError(path, "must be a port number 1-65535 or a port name")


def anything(value: Any, path: str) -> Any:
    return copy.deepcopy(value)


def mapping(value: Any, path: str) -> dict[str, Any]:
    """A free-form mapping (contents not checked)."""
    if not isinstance(value, Mapping):
        raise FieldError(path, "must be a mapping")
    return copy.deepcopy(dict(value))


def list_of(check: Check) -> Check:
    def check_list(value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            raise FieldError(path, "must be a list")
        return [check(v, item(path, i)) for i, v in enumerate(value)]

    return check_list


def map_of(check: Check) -> Check:
    def check_map(value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise FieldError(path, "must be a mapping")
        out = {}
        for key, v in value.items():
            if not isinstance(key, str):
                raise FieldError(path, f"key {key!r} must be a string")
            out[key] = check(v, key_of(path, key))
        return out

    return check_map


_MISSING = object()


class Struct:
    """A mapping with known fields. See the module docstring for the rules."""

    def __init__(
        self,
        fields: Mapping[str, Check],
        *,
        required: tuple[str, ...] = (),
        defaults: Mapping[str, Any] | None = None,
        open: bool = False,
        post: Post | None = None,
    ) -> None:
        self.fields = dict(fields)
        self.required = required
        self.defaults = dict(defaults or {})
        self.open = open
        self.post = post

    def __call__(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise FieldError(path, "must be a mapping")
        out: dict[str, Any] = {}
        for key, v in value.items():
            check = self.fields.get(key)
            if check is None:
                if not self.open:
                    raise FieldError(at(path, str(key)), "unknown field")
                out[key] = copy.deepcopy(v)
            elif v is not None:
                out[key] = check(v, at(path, key))
        for key in self.required:
            if key not in out:
                raise FieldError(at(path, key), "required")
        for key, default in self.defaults.items():
            if key not in out:
                value = default(out) if callable(default) else copy.deepcopy(default)
                if value is not _MISSING:
                    check = self.fields.get(key)
                    out[key] = check(value, at(path, key)) if check else value
        return self.post(out, path) if self.post else out

    def extend(self, fields: Mapping[str, Check], **kwargs: Any) -> Struct:
        """A copy with more fields (and, optionally, other settings)."""
        settings: dict[str, Any] = {
            "required": self.required,
            "defaults": self.defaults,
            "open": self.open,
            "post": self.post,
        }
        settings.update(kwargs)
        return Struct({**self.fields, **fields}, **settings)


MISSING = _MISSING
"""Returned by a callable default to leave the field absent."""
