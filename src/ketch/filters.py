"""containerd's filter language, for List calls and event subscriptions.

A request carries a list of filter strings; an object is selected when **any** string matches
it (an empty list selects everything). One string is a comma-separated list of selectors, and
**all** of them must match::

    selectors := selector ("," selector)*
    selector  := fieldpath [operator value]
    fieldpath := field ("." field)*
    field     := [A-Za-z0-9_]+ | "double-quoted"
    operator  := "==" | "!=" | "~="
    value     := [^\\s,]+ | "double-quoted"      (after "~=" also /quoted/ or |quoted|)

Without an operator a selector asks that the field be present. ``==`` needs the field present
and equal; ``!=`` compares the value, absent reading as ""; ``~=`` searches the value with a
regular expression. Quoted strings take Go's escapes (``\\n``, ``\\x41``, ``\\u00e9``, ``\\"``).
Examples: ``labels."com.example.x"==1``, ``namespace==moby,topic~=|^/tasks/|``.

Objects are seen through an *adaptor*: a function from a field path to ``(value, present)``.
:func:`adaptor_for` builds one from a dict of fields.

The behaviour, positions and error texts follow containerd 1.6 ``filters/`` exactly (its
scanner, parser, unquoting and selector semantics); the code is our own.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ketch.errdefs import InvalidArgument

__all__ = ["ALWAYS", "Adaptor", "Filter", "adaptor_for", "lookup_map", "parse"]

#: field path → (value, present)
Adaptor = Callable[[Sequence[str]], tuple[str, bool]]


class Filter(Protocol):
    """A parsed filter: ``match(adaptor)`` says whether the object behind ``adaptor`` is selected."""

    def match(self, adaptor: Adaptor) -> bool: ...


class _Always:
    def match(self, adaptor: Adaptor) -> bool:
        return True

    def __repr__(self) -> str:
        return "ALWAYS"


#: the filter that selects everything (what an empty list of filter strings parses to)
ALWAYS: Filter = _Always()


@dataclass(frozen=True, slots=True)
class _AnyOf:
    filters: tuple[Filter, ...]

    def match(self, adaptor: Adaptor) -> bool:
        return any(f.match(adaptor) for f in self.filters)


@dataclass(frozen=True, slots=True)
class _AllOf:
    filters: tuple[Filter, ...]

    def match(self, adaptor: Adaptor) -> bool:
        return all(f.match(adaptor) for f in self.filters)


class _Op(enum.Enum):
    PRESENT = "?"  #: no operator: the field must be present
    EQUAL = "=="  #: present and equal
    NOT_EQUAL = "!="  #: not equal; an absent field reads as ""
    MATCHES = "~="  #: the regular expression is found in the value


@dataclass(frozen=True, slots=True)
class _Selector:
    fieldpath: tuple[str, ...]
    op: _Op
    value: str = ""
    #: compiled for MATCHES; None when the expression does not compile (then nothing matches,
    #: as in containerd, which logs and returns false instead of failing the request)
    regex: re.Pattern[str] | None = None

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.fieldpath)
        if self.op is _Op.PRESENT:
            return present
        if self.op is _Op.EQUAL:
            return present and value == self.value
        if self.op is _Op.NOT_EQUAL:
            return value != self.value
        return self.regex is not None and self.regex.search(value) is not None


def parse(strings: Iterable[str] | str) -> Filter:
    """Parse filter strings into one :class:`Filter` that matches when any of them does.

    An empty list, and an empty string within it, match everything. A single ``str`` is taken
    as one filter. Raises :class:`~ketch.errdefs.InvalidArgument` naming the position.
    """
    if isinstance(strings, str):
        strings = [strings]
    parsed = tuple(_parse_one(s) for s in strings)
    if not parsed:
        return ALWAYS
    return _AnyOf(parsed)


def _parse_one(s: str) -> Filter:
    if s == "":
        return ALWAYS
    return _Parser(s).parse()


# ---------------------------------------------------------------------------------------------
# adaptors


def lookup_map(rest: Sequence[str], mapping: Mapping[str, str] | None) -> tuple[str, bool]:
    """A label-style lookup: the remaining path components joined by ``.`` form one key."""
    if not mapping:
        return "", False
    key = ".".join(rest)
    if key in mapping:
        return mapping[key], True
    return "", False


def adaptor_for(fields: Mapping[str, Any]) -> Adaptor:
    """An adaptor over a dict of fields, with containerd's conventions.

    - a ``str`` value is present when non-empty (ketch stores no empty label values, so for
      labels this is the same as containerd's "key in map");
    - a ``Mapping`` is either a label map (``labels.a.b`` looks up the key ``"a.b"``) or a nested
      struct (``runtime.name``): the joined key is tried first, then the first component;
    - a callable is called once, on first use, and its result treated the same way (lazy,
      e.g. decoding an event payload only when a filter asks for ``event.*``);
    - anything else (None, numbers) is absent: containerd exposes string fields only.
    """
    cache: dict[int, object] = {}

    def resolve(node: object) -> object:
        if callable(node):
            key = id(node)
            if key not in cache:
                cache[key] = node()
            return cache[key]
        return node

    def walk(node: object, path: Sequence[str]) -> tuple[str, bool]:
        node = resolve(node)
        if not path:
            if isinstance(node, str):
                return node, len(node) > 0
            return "", False
        if not isinstance(node, Mapping):
            return "", False
        joined = ".".join(path)
        if joined in node:
            leaf = resolve(node[joined])
            if isinstance(leaf, str):
                return leaf, len(leaf) > 0
        if len(path) > 1 and path[0] in node:
            return walk(node[path[0]], path[1:])
        return "", False

    def adaptor(fieldpath: Sequence[str]) -> tuple[str, bool]:
        if not fieldpath or fieldpath[0] not in fields:
            return "", False
        return walk(fields[fieldpath[0]], fieldpath[1:])

    return adaptor


# ---------------------------------------------------------------------------------------------
# scanner: one rune at a time, positions are indices into the string


class _Tok(enum.Enum):
    EOF = "EOF"
    QUOTED = "Quoted"
    VALUE = "Value"
    FIELD = "Field"
    SEPARATOR = "Separator"
    OPERATOR = "Operator"
    ILLEGAL = "Illegal"
    OTHER = "Other"  #: a character that starts no token; the text is the character


_EOF = ""  # what _next() returns at the end of input
_ILLEGAL = "\0"  # what _next() returns for a character that may not appear (NUL)
_QUOTES = frozenset('/|"')
_SEPARATORS = frozenset(",.")
_OPERATOR_CHARS = frozenset("=!~")
_SIMPLE_ESCAPES = frozenset("abfnrtv\\")
_OCTAL = frozenset("01234567")


def _is_field_char(ch: str) -> bool:
    return ch == "_" or ("a" <= ch <= "z") or ("A" <= ch <= "Z") or ("0" <= ch <= "9")


def _is_value_char(ch: str) -> bool:
    return ch not in (_EOF, ",") and not ch.isspace() and ch.isprintable()


def _digit_value(ch: str) -> int:
    if "0" <= ch <= "9":
        return ord(ch) - ord("0")
    if "a" <= ch <= "f":
        return ord(ch) - ord("a") + 10
    if "A" <= ch <= "F":
        return ord(ch) - ord("A") + 10
    return 16


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0  # start of the current character
        self.ppos = 0  # end of the current character
        self.in_value = False  # an operator was just read: what follows is a value
        self.err = ""

    def _next(self) -> str:
        if self.pos >= len(self.text):
            return _EOF
        self.pos = self.ppos
        if self.ppos >= len(self.text):
            return _EOF
        ch = self.text[self.ppos]
        self.ppos += 1
        if ch == "\0":
            self._error("unexpected null")
            return _ILLEGAL
        return ch

    def peek(self) -> str:
        pos, ppos = self.pos, self.ppos
        ch = self._next()
        self.pos, self.ppos = pos, ppos
        return ch

    def _error(self, msg: str) -> None:
        if not self.err:
            self.err = msg

    def scan(self) -> tuple[int, _Tok, str]:
        ch = self._next()
        pos = self.pos
        while ch != _EOF and ch != _ILLEGAL and ch.isspace():
            ch = self._next()
            pos = self.pos
        if ch == _EOF:
            return self.pos, _Tok.EOF, ""
        if ch == _ILLEGAL:
            return self.pos, _Tok.ILLEGAL, ""
        if ch in _QUOTES:
            ok = self._scan_quoted(ch)
            return pos, (_Tok.QUOTED if ok else _Tok.ILLEGAL), self.text[pos:self.ppos]
        if ch in _SEPARATORS:
            self.in_value = False
            return pos, _Tok.SEPARATOR, self.text[pos:self.ppos]
        if ch in _OPERATOR_CHARS:
            while self.peek() in _OPERATOR_CHARS:
                self._next()
            self.in_value = True
            return pos, _Tok.OPERATOR, self.text[pos:self.ppos]
        if self.in_value:
            while _is_value_char(self.peek()):
                self._next()
            self.in_value = False
            return pos, _Tok.VALUE, self.text[pos:self.ppos]
        if _is_field_char(ch):
            while _is_field_char(self.peek()):
                self._next()
            return pos, _Tok.FIELD, self.text[pos:self.ppos]
        return self.pos, _Tok.OTHER, ch

    def _scan_quoted(self, quote: str) -> bool:
        legal = True
        ch = self._next()
        while ch != quote:
            if ch in ("\n", _EOF, _ILLEGAL):
                self._error("quoted literal not terminated")
                return False
            if ch == "\\":
                ch, ok = self._scan_escape(quote)
                legal = legal and ok
            else:
                ch = self._next()
        return legal

    def _scan_escape(self, quote: str) -> tuple[str, bool]:
        ch = self._next()
        if ch != _EOF and (ch in _SIMPLE_ESCAPES or ch == quote):
            return self._next(), True
        if ch != _EOF and ch in _OCTAL:
            return self._scan_digits(ch, 8, 3)
        if ch == "x":
            return self._scan_digits(self._next(), 16, 2)
        if ch == "u":
            return self._scan_digits(self._next(), 16, 4)
        if ch == "U":
            return self._scan_digits(self._next(), 16, 8)
        self._error("illegal escape sequence")
        return ch, False

    def _scan_digits(self, ch: str, base: int, n: int) -> tuple[str, bool]:
        while n > 0 and _digit_value(ch) < base:
            ch = self._next()
            n -= 1
        if n > 0:
            self._error("illegal numeric escape sequence")
            return ch, False
        return ch, True


# ---------------------------------------------------------------------------------------------
# unquoting: Go string-literal syntax, with / and | accepted as double quotes


class _QuoteSyntax(Exception):
    pass


_CHAR_ESCAPES = {"a": 0x07, "b": 0x08, "f": 0x0C, "n": 0x0A, "r": 0x0D, "t": 0x09, "v": 0x0B, "\\": 0x5C}
_HEX_WIDTH = {"x": 2, "u": 4, "U": 8}


def _unquote(s: str) -> str:
    if len(s) < 2 or s[0] != s[-1] or s[0] not in "\"'|/":
        raise _QuoteSyntax
    quote, body = s[0], s[1:-1]
    if "\n" in body:
        raise _QuoteSyntax
    if quote != "'" and "\\" not in body and quote not in body:
        return body
    # Escapes may produce raw bytes (\xff, \377), as in Go: build bytes, then decode them;
    # bytes that are not UTF-8 survive as surrogate escapes and compare unequal to any label.
    out = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c == quote:
            raise _QuoteSyntax
        if c != "\\":
            out += c.encode("utf-8", "surrogatepass")
            i += 1
            continue
        if i + 1 >= len(body):
            raise _QuoteSyntax
        c = body[i + 1]
        i += 2
        if c in _CHAR_ESCAPES:
            out.append(_CHAR_ESCAPES[c])
        elif c in _HEX_WIDTH:
            width = _HEX_WIDTH[c]
            digits = body[i:i + width]
            if len(digits) < width or any(_digit_value(d) >= 16 for d in digits):
                raise _QuoteSyntax
            i += width
            v = int(digits, 16)
            if c == "x":
                out.append(v)
            elif v > 0x10FFFF:
                raise _QuoteSyntax
            else:
                # Go encodes a surrogate code point as U+FFFD
                out += (chr(v) if not 0xD800 <= v <= 0xDFFF else "\ufffd").encode()
        elif c in _OCTAL:
            digits = body[i - 1:i + 2]
            if len(digits) < 3 or any(d not in _OCTAL for d in digits):
                raise _QuoteSyntax
            i += 2
            v = int(digits, 8)
            if v > 255:
                raise _QuoteSyntax
            out.append(v)
        elif c in "'\"|/":
            if c != quote:
                raise _QuoteSyntax
            out += c.encode()
        else:
            raise _QuoteSyntax
        if quote == "'" and i < len(body):
            raise _QuoteSyntax  # a single-quoted literal is one character
    return out.decode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------------------------
# parser


class _ParseError(Exception):
    pass


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.scanner = _Scanner(text)

    def parse(self) -> Filter:
        try:
            return self._selectors()
        except _ParseError as exc:
            raise InvalidArgument(f"filters: {exc}") from None

    def _error(self, pos: int, msg: str) -> _ParseError:
        text = self.text
        if pos < len(text):
            where = f"[{text[:pos]} >|{text[pos:pos + 1]}|< {text[pos + 1:]}]"
        else:
            where = f"[{text}]"
        return _ParseError(f"parse error: {where}: {msg}")

    def _selectors(self) -> Filter:
        selectors = [self._selector()]
        while True:
            ch = self.scanner.peek()
            if ch == _EOF:
                return _AllOf(tuple(selectors))
            if ch != ",":
                raise self._error(self.scanner.ppos, f"unexpected input: {ch}")
            pos, tok, _ = self.scanner.scan()
            if tok is not _Tok.SEPARATOR:
                raise self._error(pos, "expected a separator")
            selectors.append(self._selector())

    def _selector(self) -> _Selector:
        fieldpath = self._fieldpath()
        if self.scanner.peek() in (",", _EOF):
            return _Selector(fieldpath, _Op.PRESENT)
        op = self._operator()
        value = self._value(allow_alt_quotes=op is _Op.MATCHES)
        regex = None
        if op is _Op.MATCHES:
            try:
                regex = re.compile(value)
            except re.error:
                regex = None
        return _Selector(fieldpath, op, value, regex)

    def _fieldpath(self) -> tuple[str, ...]:
        fields = [self._field()]
        while self.scanner.peek() == ".":
            pos, tok, _ = self.scanner.scan()
            if tok is not _Tok.SEPARATOR:
                raise self._error(pos, "expected a field separator (`.`)")
            fields.append(self._field())
        return tuple(fields)

    def _field(self) -> str:
        pos, tok, text = self.scanner.scan()
        if tok is _Tok.FIELD:
            return text
        if tok is _Tok.QUOTED:
            return self._unquote(pos, text, allow_alts=False)
        if tok is _Tok.ILLEGAL:
            raise self._error(pos, self.scanner.err)
        raise self._error(pos, "expected field or quoted")

    def _operator(self) -> _Op:
        pos, tok, text = self.scanner.scan()
        if tok is _Tok.OPERATOR:
            for op in (_Op.EQUAL, _Op.NOT_EQUAL, _Op.MATCHES):
                if text == op.value:
                    return op
            raise self._error(pos, f'unsupported operator "{text}"')
        if tok is _Tok.ILLEGAL:
            raise self._error(pos, self.scanner.err)
        raise self._error(pos, 'expected an operator ("=="|"!="|"~=")')

    def _value(self, allow_alt_quotes: bool) -> str:
        pos, tok, text = self.scanner.scan()
        if tok is _Tok.VALUE or tok is _Tok.FIELD:
            return text
        if tok is _Tok.QUOTED:
            return self._unquote(pos, text, allow_alt_quotes)
        if tok is _Tok.ILLEGAL:
            raise self._error(pos, self.scanner.err)
        raise self._error(pos, "expected value or quoted")

    def _unquote(self, pos: int, text: str, allow_alts: bool) -> str:
        if not allow_alts and text[0] not in "'\"":
            raise self._error(pos, "invalid quote encountered")
        try:
            return _unquote(text)
        except _QuoteSyntax:
            raise self._error(pos, "unquoting failed: quote syntax error") from None
