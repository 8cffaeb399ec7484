"""erq's configuration: defaults < TOML file < ``ERQ_*`` environment < command-line flags.

Everything is validated up front into frozen dataclasses, so the server never meets a bad value at
run time. A :class:`ConfigError` names the setting and, for the file, the line it is on: tomllib
reports no positions for values, so :class:`TomlLocator` re-reads the text to find them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .toml_lines import TomlLocator

__all__ = [
    "KiB",
    "MiB",
    "GiB",
    "TiB",
    "Config",
    "ConfigError",
    "QueueConfig",
    "ServerConfig",
    "load_config",
    "parse_duration",
    "parse_size",
]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

_SIZE_UNITS = {"B": 1, "KiB": KiB, "MiB": MiB, "GiB": GiB, "TiB": TiB}
_DURATION_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_NUMBER_WITH_UNIT = re.compile(r"([0-9]+) ?([A-Za-z]*)")
_SIZE_HINT = 'a size in bytes or a string like "64MiB" (units B, KiB, MiB, GiB, TiB)'
_DURATION_HINT = 'a duration in milliseconds or a string like "30s" (units ms, s, m, h, d)'
_NONE = "none"  # the string that means "unset" for every setting whose default is unset


class ConfigError(Exception):
    """A bad setting. ``str(e)`` is one line: where (file and line), which key, what is wrong."""

    def __init__(
        self,
        problem: str,
        *,
        key: str | None = None,
        source: str | None = None,
        line: int | None = None,
    ) -> None:
        self.problem = problem
        self.key = key
        self.source = source
        self.line = line
        parts = []
        if source is not None:
            parts.append(source if line is None else f"{source} line {line}")
        if key is not None:
            parts.append(key)
        parts.append(problem)
        super().__init__(": ".join(parts))


# ---------------------------------------------------------------------------------------------
# The settings


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """One queue's effective policy (PROTOCOL section 7). Sizes in bytes, durations in ms."""

    max_items: int | None = None  # None = unlimited; 0 = a limit of zero (refuses every item)
    max_size: int | None = None
    max_item_size: int | None = None  # None = the server's max_item_size applies
    max_age: int | None = None
    discard_old_when_full: bool = False
    max_memory_size: int = 128 * MiB
    expire_to_queue: str | None = None
    max_queue_age: int | None = None
    open_timeout: int | None = None
    fsync: str | int = 100  # "always" | "never" | period in ms (> 0)
    journal: bool = True
    max_journal_size: int = 1 * GiB

    def expire_target(self, name: str) -> str | None:
        """Where the expired items of the queue ``name`` go: ``expire_to_queue``, unless that
        is the queue itself (a ``[queues.default]`` target inherits it), which drops them."""
        target = self.expire_to_queue
        return None if target == name else target

    def canonical(self, name: str | None = None) -> list[tuple[str, str]]:
        """The 12 keys in ``dump_config`` order with their canonical values (PROTOCOL section 10);
        with the queue's ``name``, the values in effect for it (``expire_target``)."""
        target = self.expire_to_queue if name is None else self.expire_target(name)
        return [
            ("max_items", _canonical(self.max_items)),
            ("max_size", _canonical(self.max_size)),
            ("max_item_size", _canonical(self.max_item_size)),
            ("max_memory_size", _canonical(self.max_memory_size)),
            ("max_journal_size", _canonical(self.max_journal_size)),
            ("max_age", _canonical(self.max_age)),
            ("max_queue_age", _canonical(self.max_queue_age)),
            ("open_timeout", _canonical(self.open_timeout)),
            ("discard_old_when_full", _canonical(self.discard_old_when_full)),
            ("journal", _canonical(self.journal)),
            ("expire_to_queue", _canonical(target)),
            ("fsync", _canonical(self.fsync)),
        ]


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Server-wide settings (PROTOCOL section 7, ``[server]``). Sizes in bytes, durations in ms."""

    host: str = "127.0.0.1"
    port: int = 22133
    admin_port: int = 2223  # 0 = no admin listener
    data_dir: str = "./erq-data"
    max_line: int = 65536
    max_item_size: int = 64 * MiB
    max_pending_data: int = 256 * MiB
    max_memory_size: int = GiB  # items held in memory over all queues (each: its own too)
    max_open_reads: int = 100
    max_connections: int = 10000
    max_queues: int = 4096
    client_timeout: int | None = None  # None = idle connections are never closed
    tcp_keepalive: int | None = 300_000  # None = no probes: a dead peer's connection stays
    expiry_sweep: int = 1000
    compat: str = "erq"  # "erq" | "kestrel"


# Changing these needs a new listener or a new data directory: `reload` cannot apply them.
_RESTART_KEYS = ("host", "port", "admin_port", "data_dir")


@dataclass(frozen=True)
class Config:
    """The whole validated configuration; ``queue_config`` resolves one queue's policy."""

    server: ServerConfig = field(default_factory=ServerConfig)
    default_queue: QueueConfig = field(default_factory=QueueConfig)
    queue_overrides: Mapping[str, Mapping[str, object]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    path: str | None = None

    def queue_config(self, name: str) -> QueueConfig:
        """Default, then the fanout parent's overrides (``parent+child``), then the queue's own.

        Not remembered: it is asked when a queue is made and at a reload, and a cache of every
        name ever made would outlive the queues (a reply queue per request)."""
        settings: dict[str, object] = {}
        parent, plus, _ = name.partition("+")
        if plus:
            settings.update(self.queue_overrides.get(parent, {}))
        settings.update(self.queue_overrides.get(name, {}))
        return replace(self.default_queue, **settings) if settings else self.default_queue

    def restart_required(self, new: Config) -> list[str]:
        """Server keys that differ in ``new`` and only take effect after a restart."""
        return [k for k in _RESTART_KEYS if getattr(self.server, k) != getattr(new.server, k)]


def _canonical(value: object) -> str:
    if value is None:
        return _NONE
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# ---------------------------------------------------------------------------------------------
# Value parsers. Each takes the value as TOML gives it (env and CLI strings are converted first)
# and the key to name in an error, and returns the typed value or raises ConfigError.


def _show(value: object) -> str:
    """A value as the user wrote it, on one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 60 else text[:56] + '..."'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return repr(value)


# The largest size (bytes) or duration (ms) a setting takes: 4 EiB, or 146 million years.
# Far past any real limit, and small enough that the server's C integers (a clock plus an
# age, a size limit in a C long) never overflow at run time.
MAX_SETTING = 2**62


def _with_unit(value: object, key: str, units: Mapping[str, int], kind: str, hint: str) -> int:
    result = _with_unit_unchecked(value, key, units, kind, hint)
    if result > MAX_SETTING:
        largest = "4 EiB" if kind == "size" else f"{MAX_SETTING} ms"
        raise ConfigError(f"{kind} {_show(value)} is too large (at most {largest})", key=key)
    return result


def _with_unit_unchecked(
    value: object, key: str, units: Mapping[str, int], kind: str, hint: str
) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"expected {hint}, got {_show(value)}", key=key)
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"expected a non-negative {kind}, got {value}", key=key)
        return value
    match = _NUMBER_WITH_UNIT.fullmatch(value)
    if match is None:
        if value.startswith("-"):
            raise ConfigError(f"expected a non-negative {kind}, got {_show(value)}", key=key)
        raise ConfigError(f"expected {hint}, got {_show(value)}", key=key)
    number, unit = match.groups()
    if not unit:
        return _decimal(number, value, key)
    if unit not in units:
        raise ConfigError(
            f"unknown {kind} unit {_show(unit)} in {_show(value)} (units: {', '.join(units)})",
            key=key,
        )
    return _decimal(number, value, key) * units[unit]


def _decimal(digits: str, value: object, key: str) -> int:
    """``int(digits)``; past Python's limit of 4,300 digits (far past every setting's range)
    int() raises ValueError, which would end a start with a traceback and a reload unanswered."""
    try:
        return int(digits)
    except ValueError:
        raise ConfigError(f"{_show(value)} has too many digits to be a setting", key=key) from None


def parse_size(value: object, key: str) -> int:
    """Bytes from an int or a string such as ``"64MiB"`` / ``"64 MiB"`` (binary units, case as
    written)."""
    return _with_unit(value, key, _SIZE_UNITS, "size", _SIZE_HINT)


def parse_duration(value: object, key: str) -> int:
    """Milliseconds from an int or a string such as ``"100ms"``, ``"30s"``, ``"5m"``, ``"1h"``,
    ``"2d"``."""
    return _with_unit(value, key, _DURATION_UNITS, "duration", _DURATION_HINT)


def _queue_name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid queue name (PROTOCOL section 1), or None."""
    if not name:
        return "it is empty"
    if not name.isascii():
        return "it is not ASCII"
    if len(name) > 250:
        return f"it is {len(name)} bytes long (at most 250)"
    for char in name:
        if char in " /.~" or not "!" <= char <= "~":
            return f"{_show(char)} is not allowed in a queue name"
    if name.count("+") > 1:
        return "'+' may appear only once (parent+child)"
    if name.startswith("+") or name.endswith("+"):
        return "'+' may not be first or last"
    return None


def _optional(parse: Callable[[object, str], object]) -> Callable[[object, str], object]:
    def parse_optional(value: object, key: str) -> object:
        return None if value == _NONE else parse(value, key)

    return parse_optional


def _positive(parse: Callable[[object, str], int], kind: str) -> Callable[[object, str], int]:
    def parse_positive(value: object, key: str) -> int:
        result = parse(value, key)
        if result == 0:
            raise ConfigError(f"expected a positive {kind}, got {_show(value)}", key=key)
        return result

    return parse_positive


def _integer(low: int, high: int | None, expected: str) -> Callable[[object, str], int]:
    def parse_integer(value: object, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected {expected}, got {_show(value)}", key=key)
        if high == MAX_SETTING and value > high:
            raise ConfigError(f"{value} is too large (at most 2**62)", key=key)
        if value < low or (high is not None and value > high):
            raise ConfigError(f"expected {expected}, got {value}", key=key)
        return value

    return parse_integer


def _between(
    parse: Callable[[object, str], int], low: str, high: str, unit: str
) -> Callable[[object, str], int]:
    """``parse``, then bounds given as values it reads (``"1KiB"``, ``"1s"``), in ``unit``."""
    low_value, high_value = parse(low, "low"), parse(high, "high")

    def parse_between(value: object, key: str) -> int:
        result = parse(value, key)
        if result < low_value:
            raise ConfigError(
                f"expected at least {low} ({low_value} {unit}), got {_show(value)}", key=key
            )
        if result > high_value:
            raise ConfigError(
                f"expected at most {high} ({high_value} {unit}), got {_show(value)}", key=key
            )
        return result

    return parse_between


def _text(value: object, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"expected a non-empty string, got {_show(value)}", key=key)
    if "\0" in value:  # the system's calls end a name there: the rest would be dropped unsaid
        raise ConfigError(f"must not contain a NUL character, got {_show(value)}", key=key)
    return value


def _compat(value: object, key: str) -> str:
    if value not in ("erq", "kestrel"):
        raise ConfigError(f'expected "erq" or "kestrel", got {_show(value)}', key=key)
    return value  # type: ignore[return-value]


def _boolean(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"expected true or false, got {_show(value)}", key=key)
    return value


def _queue_name(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f'expected a queue name or "none", got {_show(value)}', key=key)
    problem = _queue_name_problem(value)
    if problem is not None:
        raise ConfigError(f"invalid queue name {_show(value)}: {problem}", key=key)
    return value


def _fsync(value: object, key: str) -> str | int:
    if value in ("always", "never"):
        return value  # type: ignore[return-value]
    try:
        period = parse_duration(value, key)
    except ConfigError:
        period = 0
    if period <= 0:
        raise ConfigError(
            f'expected "always", "never" or a positive period like "100ms", got {_show(value)}',
            key=key,
        )
    return period


# A connection holds up to max_line bytes of a line it has not finished: without a ceiling, a
# client sending no newline could make the server hold as much as the setting says (1TiB was
# taken). 64 MiB, the default max_item_size, is a thousand times the longest get of 250 keys.
MAX_LINE = "64MiB"
# The longest idle time TCP keepalive takes (Linux's TCP_KEEPIDLE bound).
MAX_KEEPALIVE_IDLE = "32767s"

_count = _integer(0, MAX_SETTING, "a non-negative integer")
_port = _integer(0, 65535, "a port number from 0 to 65535")
_positive_count = _integer(1, MAX_SETTING, "a positive integer")

# Key -> parser. A key whose default is None also accepts "none". The dict order is the order the
# example file and the error hints use.
_SERVER_SETTINGS: dict[str, Callable[[object, str], object]] = {
    "host": _text,
    "port": _port,
    "admin_port": _port,
    "data_dir": _text,
    "max_line": _between(parse_size, "1KiB", MAX_LINE, "bytes"),
    "max_item_size": parse_size,
    "max_pending_data": parse_size,
    "max_memory_size": parse_size,
    "max_open_reads": _positive_count,
    "max_connections": _positive_count,
    "max_queues": _positive_count,
    "client_timeout": _optional(_positive(parse_duration, "duration")),
    "tcp_keepalive": _optional(_between(parse_duration, "1s", MAX_KEEPALIVE_IDLE, "ms")),
    "expiry_sweep": _positive(parse_duration, "duration"),
    "compat": _compat,
}
_SERVER_INTEGER_KEYS = frozenset(
    {"port", "admin_port", "max_open_reads", "max_connections", "max_queues"}
)

_QUEUE_SETTINGS: dict[str, Callable[[object, str], object]] = {
    "max_items": _optional(_count),
    "max_size": _optional(parse_size),
    "max_item_size": _optional(parse_size),
    "max_age": _optional(parse_duration),
    "discard_old_when_full": _boolean,
    "max_memory_size": parse_size,
    "expire_to_queue": _optional(_queue_name),
    "max_queue_age": _optional(parse_duration),
    "open_timeout": _optional(_positive(parse_duration, "duration")),
    "fsync": _fsync,
    "journal": _boolean,
    "max_journal_size": parse_size,
}

assert list(_SERVER_SETTINGS) == [f.name for f in fields(ServerConfig)]
assert list(_QUEUE_SETTINGS) == [f.name for f in fields(QueueConfig)]


def _unknown_key(key: str, known: Mapping[str, object], elsewhere: Mapping[str, object]) -> str:
    if key in elsewhere:
        return (
            "is a queue setting: put it in [queues.default] or [queues.<name>]"
            if elsewhere is _QUEUE_SETTINGS
            else "is a server setting: put it in [server]"
        )
    import difflib  # only for a mistake: the server on its defaults does without it

    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f'unknown key (did you mean "{close[0]}"?)'
    return f"unknown key (known: {', '.join(known)})"


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class _FileSettings:
    server: dict[str, object] = field(default_factory=dict)
    queues: dict[str, dict[str, object]] = field(default_factory=dict)


def _read_file(path: str) -> _FileSettings:
    # Imported only when there is a file to read: tomllib is ~0.6 MiB of the RSS of a server
    # on its embedded defaults.
    import tomllib

    from .toml_lines import TomlLocator

    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as e:
        raise ConfigError(f"cannot read the config file: {e.strerror or e}", source=path) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError("not valid UTF-8", source=path, line=line) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _syntax_error(str(e), text, path) from None
    except ValueError:  # int() refusing an integer of over 4,300 digits: tomllib lets it out
        raise _long_number_error(text, path) from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise ConfigError("arrays or inline tables nested too deeply", source=path) from None
    return _validate_document(document, TomlLocator(text), path)


def _syntax_error(message: str, text: str, path: str) -> ConfigError:
    found = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message, re.DOTALL)
    if found is not None:
        reason, line, column = found.groups()
        return ConfigError(
            f"TOML syntax error at column {column}: {reason}", source=path, line=int(line)
        )
    reason = message.removesuffix(" (at end of document)")
    last_line = text.rstrip().count("\n") + 1
    return ConfigError(f"TOML syntax error at end of file: {reason}", source=path, line=last_line)


def _long_number_error(text: str, path: str) -> ConfigError:
    found = re.search(r"[0-9_]{4301,}", text)
    line = None if found is None else text.count("\n", 0, found.start()) + 1
    return ConfigError("an integer has too many digits to be a setting", source=path, line=line)


def _validate_document(document: dict, locator: TomlLocator, path: str) -> _FileSettings:
    from .toml_lines import key_name, table_name  # loaded already by _read_file

    def error(problem: str, where: tuple[str, ...], key: str) -> ConfigError:
        return ConfigError(problem, key=key, source=path, line=locator.line_of(where))

    def settings(
        table: dict,
        where: tuple[str, ...],
        known: dict[str, Callable[[object, str], object]],
        elsewhere: dict[str, Callable[[object, str], object]],
    ) -> dict[str, object]:
        parsed = {}
        for key, value in table.items():
            shown = f"{table_name(where)} {key_name(key)}"
            if key not in known:
                raise error(_unknown_key(key, known, elsewhere), (*where, key), shown)
            try:
                parsed[key] = known[key](value, shown)
            except ConfigError as e:
                raise error(e.problem, (*where, key), shown) from None
        return parsed

    result = _FileSettings()
    for name, table in document.items():
        if name not in ("server", "queues"):
            if not isinstance(table, dict):
                problem = "is not in a table: settings go in [server] or [queues.<name>]"
                raise error(problem, (name,), key_name(name))
            problem = "unknown table (erq reads [server], [queues.default] and [queues.<name>])"
            raise error(problem, (name,), table_name((name,)))
        if not isinstance(table, dict):
            raise error(f"expected a table, got {_show(table)}", (name,), table_name((name,)))
        if name == "server":
            result.server = settings(table, ("server",), _SERVER_SETTINGS, _QUEUE_SETTINGS)
        else:  # "queues"
            for queue, queue_table in table.items():
                where = ("queues", queue)
                if not isinstance(queue_table, dict):
                    raise error(
                        f"expected a table of queue settings, got {_show(queue_table)}",
                        where,
                        table_name(where),
                    )
                problem = None if queue == "default" else _queue_name_problem(queue)
                if problem is not None:
                    raise error(f"invalid queue name: {problem}", where, table_name(where))
                result.queues[queue] = settings(
                    queue_table, where, _QUEUE_SETTINGS, _SERVER_SETTINGS
                )
    return result


def _from_text(key: str, value: object, shown: str) -> object:
    """An environment or command-line value, parsed the way the file's value would be."""
    if isinstance(value, str) and key in _SERVER_INTEGER_KEYS:
        if re.fullmatch(r"[+-]?[0-9]+", value) is None:
            raise ConfigError(f"expected an integer, got {_show(value)}", key=shown)
        value = _decimal(value, value, shown)
    return _SERVER_SETTINGS[key](value, shown)


def _check_ports_differ(server: ServerConfig) -> None:
    """The admin listener opens first: on the memcache port it would fail the start only
    after the journals' replay. Either may come from the file, the environment or a flag."""
    if server.admin_port and server.admin_port == server.port:
        raise ConfigError(
            f"{server.admin_port} is the memcache port too: the admin HTTP port needs its own "
            "(0 = off)",
            key="admin_port",
        )


def load_config(
    path: str | os.PathLike[str] | None = None,
    cli: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Build the configuration: defaults < file < ``ERQ_*`` environment < ``cli``.

    ``path`` falls back to ``$ERQ_CONFIG``; with neither, no file is read. ``env`` defaults to
    ``os.environ``; only ``ERQ_CONFIG`` and ``ERQ_<SERVER KEY>`` count there, and an empty value
    counts as unset. ``cli`` maps server keys to typed values or strings; None means not given.
    """
    env = os.environ if env is None else env
    if path is None:
        path = env.get("ERQ_CONFIG") or None
    path = None if path is None else os.fspath(path)
    if path == "":  # --config "$UNSET": an error that names no file would say nothing
        raise ConfigError('the name is empty ("")', key="configuration file")

    file = _read_file(path) if path is not None else _FileSettings()
    server = dict(file.server)
    for key in _SERVER_SETTINGS:
        name = f"ERQ_{key.upper()}"
        value = env.get(name)
        if value:
            server[key] = _from_text(key, value, f"environment variable {name}")
    for key, value in (cli or {}).items():
        flag = "--" + key.replace("_", "-")
        if key not in _SERVER_SETTINGS:
            raise ConfigError("unknown server setting", key=f"command-line option {flag}")
        if value is not None:
            server[key] = _from_text(key, value, f"command-line option {flag}")

    server_config = ServerConfig(**server)  # type: ignore[arg-type]
    _check_ports_differ(server_config)
    queues = dict(file.queues)
    default_queue = QueueConfig(**queues.pop("default", {}))  # type: ignore[arg-type]
    return Config(
        server=server_config,
        default_queue=default_queue,
        queue_overrides=MappingProxyType(
            {name: MappingProxyType(values) for name, values in queues.items()}
        ),
        path=path,
    )
