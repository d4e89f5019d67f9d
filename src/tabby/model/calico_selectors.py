"""Calico's selector expressions (``peerSelector``, ``nodeSelector``), the subset BGP uses.

``all()``, ``has(k)``, ``k == 'v'``, ``k != 'v'``, ``k in {'a', 'b'}``, ``k not in {...}``,
``!``, ``&&``, ``||`` and parentheses, with Calico's meaning (``k != 'v'`` holds when ``k`` is
absent). ``parse`` judges an expression once (ValueError naming the problem); the result is a
pure predicate over a label map. An empty expression selects nothing, as in Calico.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

Labels = Mapping[str, str]
Predicate = Callable[[Labels], bool]

_TOKEN = re.compile(
    r"\s*(?:(?P<op>==|!=|&&|\|\||[!(){},])|(?P<str>'[^']*'|\"[^\"]*\")|(?P<word>[A-Za-z0-9_./-]+))"
)


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"unexpected character at {pos}: {text[pos : pos + 10]!r}")
        out.append(m.group(0).strip())
        pos = m.end()
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, want: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (want is not None and tok != want):
            raise ValueError(f"expected {want or 'more'}, got {tok or 'end of expression'}")
        self.i += 1
        return tok

    def expr(self) -> Predicate:
        terms = [self.conj()]
        while self.peek() == "||":
            self.take()
            terms.append(self.conj())
        return terms[0] if len(terms) == 1 else lambda lb: any(t(lb) for t in terms)

    def conj(self) -> Predicate:
        terms = [self.unary()]
        while self.peek() == "&&":
            self.take()
            terms.append(self.unary())
        return terms[0] if len(terms) == 1 else lambda lb: all(t(lb) for t in terms)

    def unary(self) -> Predicate:
        if self.peek() == "!":
            self.take()
            inner = self.unary()
            return lambda lb: not inner(lb)
        if self.peek() == "(":
            self.take()
            inner = self.expr()
            self.take(")")
            return inner
        return self.term()

    def term(self) -> Predicate:
        word = self.take()
        if word == "all" and self.peek() == "(":
            self.take("(")
            self.take(")")
            return lambda _lb: True
        if word == "has" and self.peek() == "(":
            self.take("(")
            key = self._key()
            self.take(")")
            return lambda lb: key in lb
        key = self._check_key(word)
        op = self.take()
        if op == "==":
            value = self._string()
            return lambda lb: lb.get(key) == value
        if op == "!=":
            value = self._string()
            return lambda lb: lb.get(key) != value
        negate = op == "not"
        if negate:
            op = self.take()
        if op != "in":
            raise ValueError(f"expected ==, !=, in or not in after {key!r}, got {op!r}")
        values = self._set()
        if negate:
            return lambda lb: lb.get(key) not in values
        return lambda lb: lb.get(key) in values

    def _key(self) -> str:
        return self._check_key(self.take())

    @staticmethod
    def _check_key(word: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_./-]+", word):
            raise ValueError(f"expected a label key, got {word!r}")
        return word

    def _string(self) -> str:
        tok = self.take()
        if len(tok) < 2 or tok[0] not in "'\"" or tok[-1] != tok[0]:
            raise ValueError(f"expected a quoted value, got {tok!r}")
        return tok[1:-1]

    def _set(self) -> frozenset[str]:
        self.take("{")
        values = set()
        while self.peek() != "}":
            values.add(self._string())
            if self.peek() == ",":
                self.take()
        self.take("}")
        return frozenset(values)


def parse(text: str) -> Predicate:
    """The predicate ``text`` means; raises ValueError saying what is wrong."""
    if not text.strip():
        return lambda _lb: False
    parser = _Parser(text)
    pred = parser.expr()
    if parser.peek() is not None:
        raise ValueError(f"unexpected {parser.peek()!r}")
    return pred


def matches(text: str, labels: Labels | None) -> bool:
    return parse(text)(labels or {})
