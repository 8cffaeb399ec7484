"""Line numbers for a TOML text that tomllib accepted (tomllib reports no positions).

Used by erq.config so that every configuration error names the line of the key it is about.
"""

from __future__ import annotations

import bisect
import json
import re
import tomllib

BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def key_name(key: str) -> str:
    return key if BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)


def table_name(path: tuple[str, ...]) -> str:
    """``("queues", "a+b")`` -> ``[queues."a+b"]``, as it would be written in the file."""
    return "[" + ".".join(key_name(part) for part in path) + "]"


class TomlLocator:
    """Line numbers of the tables and keys of a TOML text that tomllib has already accepted.

    A small scanner of TOML's statements (headers, dotted keys, strings of every kind, arrays and
    inline tables spanning lines) that records, for every key path, the line that first names it.
    It is best effort: should it stop early, a key falls back to the nearest enclosing table.
    """

    def __init__(self, text: str) -> None:
        self._text = text
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.lines: dict[tuple[str, ...], int] = {}
        try:
            self._scan()
        except (IndexError, ValueError, tomllib.TOMLDecodeError):
            pass

    def line_of(self, path: tuple[str, ...]) -> int | None:
        for length in range(len(path), 0, -1):
            line = self.lines.get(path[:length])
            if line is not None:
                return line
        return None

    def _line(self, pos: int) -> int:
        return bisect.bisect_right(self._line_starts, pos)

    def _record(self, path: tuple[str, ...], pos: int) -> None:
        line = self._line(pos)
        for length in range(1, len(path) + 1):
            self.lines.setdefault(path[:length], line)

    def _skip(self, pos: int, newlines: bool) -> int:
        """Past spaces and tabs, and with ``newlines`` also past newlines and comments."""
        text = self._text
        while pos < len(text):
            char = text[pos]
            if char in " \t" or (newlines and char in "\r\n"):
                pos += 1
            elif newlines and char == "#":
                end = text.find("\n", pos)
                pos = len(text) if end < 0 else end
            else:
                break
        return pos

    def _scan(self) -> None:
        text = self._text
        table: tuple[str, ...] = ()
        pos = self._skip(0, newlines=True)
        while pos < len(text):
            if text[pos] == "[":
                start = pos
                brackets = 2 if text.startswith("[[", pos) else 1
                table, pos = self._key(pos + brackets)
                pos = self._skip(pos, newlines=False) + brackets
                self._record(table, start)
            else:
                key, end = self._key(pos)
                self._record(table + key, pos)
                pos = self._skip(end, newlines=False)
                if text[pos] != "=":
                    raise ValueError("expected '='")
                pos = self._value(pos + 1, table + key)
            pos = self._skip(pos, newlines=True)

    def _key(self, pos: int) -> tuple[tuple[str, ...], int]:
        """A dotted key starting at ``pos`` (after optional blanks) and the position after it."""
        text = self._text
        parts = []
        while True:
            pos = self._skip(pos, newlines=False)
            if text[pos] == '"':
                end = self._basic_string_end(pos)
                parts.append(tomllib.loads("k = " + text[pos:end])["k"])
            elif text[pos] == "'":
                end = text.index("'", pos + 1) + 1
                parts.append(text[pos + 1 : end - 1])
            else:
                match = BARE_KEY.match(text, pos)
                if match is None:
                    raise ValueError("expected a key")
                end = match.end()
                parts.append(match.group())
            pos = self._skip(end, newlines=False)
            if pos < len(text) and text[pos] == ".":
                pos += 1
                continue
            return tuple(parts), pos

    def _basic_string_end(self, pos: int) -> int:
        text = self._text
        pos += 1
        while text[pos] != '"':
            pos += 2 if text[pos] == "\\" else 1
        return pos + 1

    def _value(self, pos: int, path: tuple[str, ...]) -> int:
        """The position just after the value starting at ``pos``; records inline tables' keys."""
        text = self._text
        pos = self._skip(pos, newlines=False)
        if text.startswith('"""', pos) or text.startswith("'''", pos):
            quote = text[pos]
            pos += 3
            while not text.startswith(quote * 3, pos):
                pos += 2 if quote == '"' and text[pos] == "\\" else 1
            pos += 3
            while pos < len(text) and text[pos] == quote:  # up to two quotes end the content
                pos += 1
            return pos
        if text[pos] == '"':
            return self._basic_string_end(pos)
        if text[pos] == "'":
            return text.index("'", pos + 1) + 1
        if text[pos] == "[":
            pos = self._skip(pos + 1, newlines=True)
            while text[pos] != "]":
                pos = self._skip(self._value(pos, path), newlines=True)
                if text[pos] == ",":
                    pos = self._skip(pos + 1, newlines=True)
            return pos + 1
        if text[pos] == "{":
            pos = self._skip(pos + 1, newlines=False)
            while text[pos] != "}":
                key, end = self._key(pos)
                self._record(path + key, pos)
                pos = self._skip(end, newlines=False) + 1  # past '='
                pos = self._skip(self._value(pos, path + key), newlines=False)
                if text[pos] == ",":
                    pos = self._skip(pos + 1, newlines=False)
            return pos + 1
        while pos < len(text) and text[pos] not in ",]}#\r\n":  # number, boolean or date
            pos += 1
        return pos
