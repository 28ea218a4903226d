"""The key locator: the line on which a key path is defined in TOML source text."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Final

from bot.config.problems import KeyPath


class _ScanStop(Exception):
    """The locator met text it does not understand; it keeps what it found so far."""


_BARE_KEY_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_SPACES: Final = frozenset(" \t")
_NEWLINES: Final = frozenset("\r\n")
_SCALAR_END: Final = frozenset(["", ",", "]", "}", "#", "\n", "\r"])
_ESCAPES: Final = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}


class KeyLocator:
    """Find the line on which a key path is defined in TOML source text.

    `tomllib` reports no positions, so this scans the text once, understanding table
    headers (``[a.b]``), arrays of tables (``[[a]]``, counted to give indices), dotted keys,
    inline tables and (multi-line) arrays, whose elements get indices.  It is meant for text
    that `tomllib` has accepted; on anything it does not understand it stops and keeps what it
    had found.
    """

    def __init__(self, text: str) -> None:
        self._text = text
        self._pos = 0
        self._line = 1
        self._lines: dict[KeyPath, int] = {}
        self._explicit: set[KeyPath] = set()
        self._tables_of_arrays: dict[KeyPath, int] = {}
        with contextlib.suppress(_ScanStop, RecursionError):
            self._document()
        self._text = ""

    def line_of(self, path: Sequence[str | int]) -> int | None:
        """The line defining `path`, else that of its nearest enclosing table, else None."""
        key = tuple(path)
        while key:
            line = self._lines.get(key)
            if line is not None:
                return line
            key = key[:-1]
        return None

    def exact_line_of(self, path: Sequence[str | int]) -> int | None:
        """The line defining exactly `path` (no fallback), or None."""
        return self._lines.get(tuple(path))

    # -- bookkeeping

    def _explicit_at(self, path: KeyPath, line: int) -> None:
        if path not in self._explicit:
            self._explicit.add(path)
            self._lines[path] = line

    def _implicit_at(self, path: KeyPath, line: int) -> None:
        self._lines.setdefault(path, line)

    def _define(self, base: KeyPath, keys: tuple[str, ...], line: int) -> None:
        for length in range(1, len(keys)):
            self._implicit_at(base + keys[:length], line)
        self._explicit_at(base + keys, line)

    # -- characters

    def _peek(self, offset: int = 0) -> str:
        index = self._pos + offset
        return self._text[index] if index < len(self._text) else ""

    def _advance(self, count: int = 1) -> None:
        chunk = self._text[self._pos : self._pos + count]
        self._line += chunk.count("\n")
        self._pos += len(chunk)

    def _skip_spaces(self) -> None:
        while self._peek() in _SPACES:
            self._pos += 1

    def _skip_blank(self, *, newlines: bool) -> None:
        while True:
            char = self._peek()
            if char in _SPACES or (newlines and char in _NEWLINES):
                self._advance()
            elif char == "#":
                end = self._text.find("\n", self._pos)
                self._pos = len(self._text) if end == -1 else end
            else:
                return

    def _expect(self, token: str) -> None:
        if not self._text.startswith(token, self._pos):
            raise _ScanStop
        self._advance(len(token))

    # -- grammar

    def _document(self) -> None:
        table: KeyPath = ()
        while True:
            self._skip_blank(newlines=True)
            char = self._peek()
            if char == "":
                return
            if char == "[":
                table = self._header()
            else:
                line = self._line
                keys = self._key()
                self._skip_spaces()
                self._expect("=")
                self._skip_spaces()
                self._define(table, keys, line)
                self._value(table + keys)
            self._skip_blank(newlines=False)
            if self._peek() not in _NEWLINES and self._peek() != "":
                raise _ScanStop

    def _header(self) -> KeyPath:
        line = self._line
        self._expect("[")
        is_array = self._peek() == "["
        if is_array:
            self._advance()
        self._skip_spaces()
        keys = self._key()
        self._skip_spaces()
        self._expect("]]" if is_array else "]")
        resolved: list[str | int] = []
        for position, part in enumerate(keys):
            resolved.append(part)
            here = tuple(resolved)
            if is_array and position == len(keys) - 1:
                index = self._tables_of_arrays.get(here, 0)
                self._tables_of_arrays[here] = index + 1
                self._implicit_at(here, line)
                resolved.append(index)
            else:
                if here in self._tables_of_arrays:
                    resolved.append(self._tables_of_arrays[here] - 1)
                self._implicit_at(tuple(resolved), line)
        path = tuple(resolved)
        self._explicit_at(path, line)
        return path

    def _key(self) -> tuple[str, ...]:
        parts = [self._simple_key()]
        while True:
            self._skip_spaces()
            if self._peek() != ".":
                return tuple(parts)
            self._advance()
            self._skip_spaces()
            parts.append(self._simple_key())

    def _simple_key(self) -> str:
        char = self._peek()
        if char == '"':
            return self._basic_string()
        if char == "'":
            return self._literal_string()
        start = self._pos
        while self._peek() in _BARE_KEY_CHARS and self._peek() != "":
            self._pos += 1
        if self._pos == start:
            raise _ScanStop
        return self._text[start : self._pos]

    def _basic_string(self) -> str:
        self._expect('"')
        out: list[str] = []
        while True:
            char = self._peek()
            if char == "" or char in _NEWLINES:
                raise _ScanStop
            if char == '"':
                self._advance()
                return "".join(out)
            if char == "\\":
                escape = self._peek(1)
                if escape in ("u", "U"):
                    width = 4 if escape == "u" else 8
                    digits = self._text[self._pos + 2 : self._pos + 2 + width]
                    try:
                        out.append(chr(int(digits, 16)))
                    except (ValueError, OverflowError) as error:
                        raise _ScanStop from error
                    self._advance(2 + width)
                else:
                    out.append(_ESCAPES.get(escape, escape))
                    self._advance(2)
            else:
                out.append(char)
                self._pos += 1

    def _literal_string(self) -> str:
        self._expect("'")
        end = self._text.find("'", self._pos)
        newline = self._text.find("\n", self._pos)
        if end == -1 or (newline != -1 and newline < end):
            raise _ScanStop
        value = self._text[self._pos : end]
        self._pos = end + 1
        return value

    def _multiline_string(self, quote: str) -> None:
        self._expect(quote * 3)
        while True:
            char = self._peek()
            if char == "":
                raise _ScanStop
            if char == "\\" and quote == '"':
                self._advance(2)
            elif self._text.startswith(quote * 3, self._pos):
                run = 3
                while run < 5 and self._peek(run) == quote:
                    run += 1
                self._advance(run)
                return
            else:
                self._advance()

    def _value(self, path: KeyPath) -> None:
        char = self._peek()
        if char in ('"', "'"):
            if self._text.startswith(char * 3, self._pos):
                self._multiline_string(char)
            elif char == '"':
                self._basic_string()
            else:
                self._literal_string()
        elif char == "[":
            self._array(path)
        elif char == "{":
            self._inline_table(path)
        else:
            start = self._pos
            while self._peek() not in _SCALAR_END:
                self._pos += 1
            if self._pos == start:
                raise _ScanStop

    def _array(self, path: KeyPath) -> None:
        self._expect("[")
        index = 0
        while True:
            self._skip_blank(newlines=True)
            if self._peek() == "]":
                self._advance()
                return
            self._explicit_at((*path, index), self._line)
            self._value((*path, index))
            self._skip_blank(newlines=True)
            if self._peek() == ",":
                self._advance()
                index += 1
            elif self._peek() == "]":
                self._advance()
                return
            else:
                raise _ScanStop

    def _inline_table(self, path: KeyPath) -> None:
        self._expect("{")
        while True:
            self._skip_blank(newlines=True)
            if self._peek() == "}":
                self._advance()
                return
            line = self._line
            keys = self._key()
            self._skip_spaces()
            self._expect("=")
            self._skip_spaces()
            self._define(path, keys, line)
            self._value(path + keys)
            self._skip_blank(newlines=True)
            if self._peek() == ",":
                self._advance()
            elif self._peek() == "}":
                self._advance()
                return
            else:
                raise _ScanStop
