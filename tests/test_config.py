"""erq.config: defaults, parsing of every key, precedence, inheritance, error messages, example."""

from __future__ import annotations

import re
from dataclasses import FrozenInstanceError, fields
from pathlib import Path

import pytest

from erq.config import (
    Config,
    ConfigError,
    GiB,
    KiB,
    MiB,
    QueueConfig,
    ServerConfig,
    TiB,
    load_config,
    parse_duration,
    parse_size,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "erq" / "example.toml"


def write(tmp_path: Path, text: str, name: str = "erq.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def load_text(tmp_path: Path, text: str, **kwargs) -> Config:
    return load_config(write(tmp_path, text), env=kwargs.pop("env", {}), **kwargs)


def config_error(tmp_path: Path, text: str) -> tuple[str, ConfigError]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    return path, info.value


# ---------------------------------------------------------------------------------------------
# Defaults


def test_no_file_gives_the_protocol_defaults():
    config = load_config(env={})
    assert config.path is None
    assert config.server == ServerConfig(
        host="127.0.0.1",
        port=22133,
        admin_port=2223,
        data_dir="./erq-data",
        max_line=65536,
        max_item_size=64 * 1024 * 1024,
        max_open_reads=100,
        max_connections=10000,
        max_queues=4096,
        client_timeout=None,
        tcp_keepalive=300_000,
        expiry_sweep=1000,
        compat="erq",
    )
    assert config.default_queue == QueueConfig()
    assert dict(config.queue_overrides) == {}
    assert config.queue_config("anything") == QueueConfig()


def test_default_queue_canonical_values_match_protocol_section_10():
    assert QueueConfig().canonical() == [
        ("max_items", "none"),
        ("max_size", "none"),
        ("max_item_size", "none"),
        ("max_memory_size", "134217728"),
        ("max_journal_size", "1073741824"),
        ("max_age", "none"),
        ("max_queue_age", "none"),
        ("open_timeout", "none"),
        ("discard_old_when_full", "false"),
        ("journal", "true"),
        ("expire_to_queue", "none"),
        ("fsync", "100"),
    ]


def test_config_values_are_frozen():
    config = load_config(env={})
    with pytest.raises(FrozenInstanceError):
        config.server.port = 1  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        config.default_queue.journal = False  # type: ignore[misc]


def test_unit_constants():
    assert (KiB, MiB, GiB, TiB) == (1024, 1024**2, 1024**3, 1024**4)


# ---------------------------------------------------------------------------------------------
# Sizes and durations


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (123, 123),
        ("123", 123),
        ("7B", 7),
        ("2KiB", 2 * 1024),
        ("64MiB", 64 * 1024**2),
        ("64 MiB", 64 * 1024**2),
        ("3GiB", 3 * 1024**3),
        ("1TiB", 1024**4),
        ("0MiB", 0),
    ],
)
def test_parse_size_accepts_bytes_and_every_unit(value, expected):
    assert parse_size(value, "max_size") == expected


@pytest.mark.parametrize(
    "value",
    [-1, "-1MiB", 1.5, "1.5GiB", "64MB", "64mib", "64kib", "64K", "MiB", "", "64  MiB", True, None],
)
def test_parse_size_rejects_negatives_floats_and_unknown_units(value):
    with pytest.raises(ConfigError) as info:
        parse_size(value, "max_size")
    assert info.value.key == "max_size"
    assert str(info.value).startswith("max_size: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("parse", "value"),
    [
        (parse_size, "99999999TiB"),
        (parse_size, 2**62 + 1),
        (parse_duration, "999999999999999d"),
        (parse_duration, 2**63 - 1),
    ],
)
def test_sizes_and_durations_past_2_to_the_62_are_refused_up_front(parse, value):
    """Larger values would pass here and overflow the server's C integers at run time (every
    connection dropped, or every set): a file with one is refused, and so is its reload."""
    with pytest.raises(ConfigError, match="too large"):
        parse(value, "max_age")
    assert parse(2**62, "max_age") == 2**62


def test_counts_past_2_to_the_62_are_refused_up_front(tmp_path):
    with pytest.raises(ConfigError, match=r"max_items: 4611686018427387905 is too large"):
        load_text(tmp_path, "[queues.default]\nmax_items = 4611686018427387905\n")


def test_max_line_takes_1024_bytes_to_64_mib_from_the_file_and_the_environment(tmp_path):
    """A connection may hold max_line bytes of an unfinished line: 1TiB was taken."""
    assert load_text(tmp_path, "[server]\nmax_line = 1024\n").server.max_line == 1024
    assert load_text(tmp_path, '[server]\nmax_line = "64MiB"\n').server.max_line == 64 * MiB
    with pytest.raises(ConfigError, match=r"ERQ_MAX_LINE: expected at most 64MiB"):
        load_config(None, env={"ERQ_MAX_LINE": "1TiB"})


def test_numbers_past_4300_digits_are_refused_in_one_line_wherever_they_come_from(tmp_path):
    """int() refuses them with ValueError, which escaped: a traceback at start."""
    digits = "9" * 5000
    for text, message in (
        (f"[server]\n\nport = {digits}\n", r"line 3: an integer has too many digits"),
        (f'[queues.x]\nmax_size = "{digits}KiB"\n', r"line 2: \[queues.x\] max_size: \"9+\.\.\."),
    ):
        with pytest.raises(ConfigError, match=message):
            load_text(tmp_path, text)
    with pytest.raises(ConfigError, match=r"ERQ_PORT: \"9+\.\.\.\" has too many digits"):
        load_config(None, env={"ERQ_PORT": digits})
    with pytest.raises(ConfigError, match=r"--max-line: \"9+\.\.\.\" has too many digits"):
        load_config(None, cli={"max_line": digits}, env={})


def test_a_file_nested_too_deeply_is_refused_in_one_line(tmp_path):
    """tomllib's RecursionError escaped: a traceback at start."""
    for nested in ("[" * 1000 + "]" * 1000, "{a = " * 1000 + "1" + "}" * 1000):
        path, error = config_error(tmp_path, f"[server]\nhost = {nested}\n")
        assert str(error) == f"{path}: arrays or inline tables nested too deeply"


def test_parse_size_names_the_unknown_unit():
    with pytest.raises(ConfigError, match=r'unknown size unit "MB" in "64MB" \(units: B, KiB'):
        parse_size("64MB", "max_size")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (250, 250),
        ("250", 250),
        ("100ms", 100),
        ("30s", 30_000),
        ("30 s", 30_000),
        ("5m", 300_000),
        ("1h", 3_600_000),
        ("2d", 172_800_000),
    ],
)
def test_parse_duration_accepts_ms_and_every_unit(value, expected):
    assert parse_duration(value, "max_age") == expected


@pytest.mark.parametrize(
    "value", [-1, "-5s", 1.5, "1.5s", "10x", "1w", "5M", "1 week", "s", True, [1], None]
)
def test_parse_duration_rejects_negatives_floats_and_unknown_units(value):
    with pytest.raises(ConfigError) as info:
        parse_duration(value, "max_age")
    assert str(info.value).startswith("max_age: ")


# ---------------------------------------------------------------------------------------------
# Every key from the file


EVERY_KEY = """\
[server]
host = "0.0.0.0"
port = 22134
admin_port = 0
data_dir = "/var/lib/erq"
max_line = "2KiB"
max_item_size = "1MiB"
max_open_reads = 7
max_connections = 50
max_queues = 70
client_timeout = "30s"
tcp_keepalive = "45s"
expiry_sweep = 250
compat = "kestrel"

[queues.default]
max_items = 1000
max_size = "10MiB"
max_item_size = 4096
max_age = "1h"
discard_old_when_full = true
max_memory_size = "1GiB"
expire_to_queue = "dead"
max_queue_age = "2d"
open_timeout = "5m"
fsync = "always"
journal = false
max_journal_size = "2TiB"
"""


def test_every_key_is_parsed_from_the_file(tmp_path):
    config = load_text(tmp_path, EVERY_KEY)
    assert config.server == ServerConfig(
        host="0.0.0.0",
        port=22134,
        admin_port=0,
        data_dir="/var/lib/erq",
        max_line=2048,
        max_item_size=1024**2,
        max_open_reads=7,
        max_connections=50,
        max_queues=70,
        client_timeout=30_000,
        tcp_keepalive=45_000,
        expiry_sweep=250,
        compat="kestrel",
    )
    assert config.default_queue == QueueConfig(
        max_items=1000,
        max_size=10 * 1024**2,
        max_item_size=4096,
        max_age=3_600_000,
        discard_old_when_full=True,
        max_memory_size=1024**3,
        expire_to_queue="dead",
        max_queue_age=172_800_000,
        open_timeout=300_000,
        fsync="always",
        journal=False,
        max_journal_size=2 * 1024**4,
    )
    assert config.path == str(tmp_path / "erq.toml")


def test_canonical_output_of_every_key(tmp_path):
    config = load_text(tmp_path, EVERY_KEY)
    assert config.queue_config("jobs").canonical() == [
        ("max_items", "1000"),
        ("max_size", "10485760"),
        ("max_item_size", "4096"),
        ("max_memory_size", "1073741824"),
        ("max_journal_size", "2199023255552"),
        ("max_age", "3600000"),
        ("max_queue_age", "172800000"),
        ("open_timeout", "300000"),
        ("discard_old_when_full", "true"),
        ("journal", "false"),
        ("expire_to_queue", "dead"),
        ("fsync", "always"),
    ]


@pytest.mark.parametrize(
    ("value", "stored", "canonical"),
    [
        ('"always"', "always", "always"),
        ('"never"', "never", "never"),
        ('"250ms"', 250, "250"),
        ('"1s"', 1000, "1000"),
        ("40", 40, "40"),
    ],
)
def test_fsync_accepts_always_never_and_a_period(tmp_path, value, stored, canonical):
    queue = load_text(tmp_path, f"[queues.default]\nfsync = {value}\n").default_queue
    assert queue.fsync == stored
    assert dict(queue.canonical())["fsync"] == canonical


def test_none_string_unsets_every_key_whose_default_is_none(tmp_path):
    text = (
        "[server]\nclient_timeout = 'none'\ntcp_keepalive = 'none'\n"
        "[queues.default]\nmax_items = 5\nmax_size = 5\nmax_item_size = 5\nmax_age = 5\n"
        "expire_to_queue = 'x'\nmax_queue_age = 5\nopen_timeout = 5\n"
        '[queues.q]\nmax_items = "none"\nmax_size = "none"\nmax_item_size = "none"\n'
        'max_age = "none"\nexpire_to_queue = "none"\nmax_queue_age = "none"\n'
        'open_timeout = "none"\n'
    )
    config = load_text(tmp_path, text)
    assert config.server.client_timeout is None and config.server.tcp_keepalive is None
    assert config.default_queue.max_items == 5
    assert config.queue_config("q") == QueueConfig()


def test_zero_max_items_and_max_size_are_limits_not_unlimited(tmp_path):
    queue = load_text(tmp_path, "[queues.default]\nmax_items = 0\nmax_size = 0\n").default_queue
    assert queue.max_items == 0
    assert queue.max_size == 0
    assert dict(queue.canonical())["max_items"] == "0"


def test_queue_overrides_hold_validated_values_and_are_read_only(tmp_path):
    config = load_text(tmp_path, '[queues.jobs]\nmax_size = "1KiB"\nfsync = "2s"\n')
    assert dict(config.queue_overrides["jobs"]) == {"max_size": 1024, "fsync": 2000}
    assert "default" not in config.queue_overrides
    with pytest.raises(TypeError):
        config.queue_overrides["other"] = {}  # type: ignore[index]
    with pytest.raises(TypeError):
        config.queue_overrides["jobs"]["journal"] = False  # type: ignore[index]


# ---------------------------------------------------------------------------------------------
# Precedence: defaults < file < environment < command line


def test_file_overrides_defaults_env_overrides_file_cli_overrides_env(tmp_path):
    path = write(tmp_path, '[server]\nport = 1000\nhost = "10.0.0.1"\ncompat = "kestrel"\n')
    assert load_config(path, env={}).server.port == 1000
    env = {"ERQ_PORT": "2000", "ERQ_DATA_DIR": "/env"}
    config = load_config(path, env=env)
    assert (config.server.port, config.server.host, config.server.data_dir) == (
        2000,
        "10.0.0.1",
        "/env",
    )
    config = load_config(path, cli={"port": 3000, "host": None, "compat": "erq"}, env=env)
    assert (config.server.port, config.server.host, config.server.compat) == (
        3000,
        "10.0.0.1",
        "erq",
    )


def test_environment_strings_are_parsed_like_file_values():
    env = {
        "ERQ_HOST": "::1",
        "ERQ_PORT": "1234",
        "ERQ_ADMIN_PORT": "0",
        "ERQ_DATA_DIR": "/tmp/q",
        "ERQ_MAX_LINE": "4KiB",
        "ERQ_MAX_ITEM_SIZE": "1MiB",
        "ERQ_MAX_OPEN_READS": "5",
        "ERQ_MAX_CONNECTIONS": "6",
        "ERQ_MAX_QUEUES": "8",
        "ERQ_CLIENT_TIMEOUT": "30s",
        "ERQ_EXPIRY_SWEEP": "2s",
        "ERQ_COMPAT": "kestrel",
    }
    assert load_config(env=env).server == ServerConfig(
        host="::1",
        port=1234,
        admin_port=0,
        data_dir="/tmp/q",
        max_line=4096,
        max_item_size=1024**2,
        max_open_reads=5,
        max_connections=6,
        max_queues=8,
        client_timeout=30_000,
        expiry_sweep=2000,
        compat="kestrel",
    )


def test_unknown_and_empty_environment_variables_are_ignored():
    env = {"ERQ_NO_EXTENSIONS": "1", "ERQ_FOO": "x", "ERQ_MAX_ITEMS": "5", "ERQ_PORT": ""}
    config = load_config(env=env)
    assert config.server == ServerConfig()
    assert config.default_queue == QueueConfig()


def test_erq_config_names_the_file_when_no_path_is_given(tmp_path):
    from_env = write(tmp_path, "[server]\nport = 1\n", "env.toml")
    given = write(tmp_path, "[server]\nport = 2\n", "given.toml")
    config = load_config(env={"ERQ_CONFIG": from_env})
    assert (config.path, config.server.port) == (from_env, 1)
    config = load_config(given, env={"ERQ_CONFIG": from_env})
    assert (config.path, config.server.port) == (given, 2)


def test_an_empty_file_name_is_refused_saying_so():
    """It read "": the message began ": cannot read the config file", naming nothing."""
    with pytest.raises(ConfigError) as info:
        load_config("", env={"ERQ_CONFIG": "ignored.toml"})
    assert str(info.value) == 'configuration file: the name is empty ("")'


def test_path_may_be_a_pathlike(tmp_path):
    path = Path(write(tmp_path, "[server]\nport = 9\n"))
    assert load_config(path, env={}).path == str(path)


def test_command_line_strings_are_parsed_and_none_means_not_given():
    config = load_config(
        cli={"port": "4000", "admin_port": None, "data_dir": "/cli", "compat": "kestrel"},
        env={"ERQ_ADMIN_PORT": "5"},
    )
    assert (config.server.port, config.server.admin_port, config.server.data_dir) == (
        4000,
        5,
        "/cli",
    )
    assert config.server.compat == "kestrel"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ERQ_PORT": "http"}, 'environment variable ERQ_PORT: expected an integer, got "http"'),
        (
            {"ERQ_PORT": "70000"},
            "environment variable ERQ_PORT: expected a port number from 0 to 65535, got 70000",
        ),
        ({"ERQ_COMPAT": "memcached"}, "environment variable ERQ_COMPAT: expected"),
        ({"ERQ_MAX_ITEM_SIZE": "1.5MiB"}, "environment variable ERQ_MAX_ITEM_SIZE: expected"),
        ({"ERQ_CLIENT_TIMEOUT": "-1s"}, "environment variable ERQ_CLIENT_TIMEOUT: expected"),
    ],
)
def test_bad_environment_value_names_the_variable(env, message):
    with pytest.raises(ConfigError) as info:
        load_config(env=env)
    assert str(info.value).startswith(message)


def test_admin_port_equal_to_port_is_refused_wherever_each_comes_from(tmp_path):
    path = write(tmp_path, "[server]\nadmin_port = 22133\n")
    for where in (
        lambda: load_config(path, env={}),
        lambda: load_config(None, env={"ERQ_PORT": "2223"}),
        lambda: load_config(None, cli={"port": 9000, "admin_port": 9000}, env={}),
    ):
        with pytest.raises(ConfigError, match=r"^admin_port: \d+ is the memcache port too"):
            where()
    assert load_config(None, cli={"port": 0, "admin_port": 0}, env={}).server.port == 0


def test_bad_command_line_value_names_the_flag():
    with pytest.raises(ConfigError, match=r"^command-line option --admin-port: expected a port"):
        load_config(cli={"admin_port": -1}, env={})
    with pytest.raises(
        ConfigError, match=r"^command-line option --port: expected a port number .*got true$"
    ):
        load_config(cli={"port": True}, env={})
    with pytest.raises(ConfigError, match=r"^command-line option --colour: unknown"):
        load_config(cli={"colour": "red"}, env={})


# ---------------------------------------------------------------------------------------------
# Per-queue settings and fanout inheritance


INHERITANCE = """\
[queues.default]
max_items = 100
max_size = "1MiB"
fsync = "never"

[queues.jobs]
max_items = 200
journal = false

[queues."jobs+audit"]
max_items = 300
"""


def test_fanout_child_inherits_default_then_parent_then_its_own(tmp_path):
    config = load_text(tmp_path, INHERITANCE)
    base = QueueConfig(max_items=100, max_size=1024**2, fsync="never")
    assert config.default_queue == base
    assert config.queue_config("other") == base
    assert config.queue_config("jobs") == QueueConfig(
        max_items=200, max_size=1024**2, fsync="never", journal=False
    )
    assert config.queue_config("jobs+audit") == QueueConfig(
        max_items=300, max_size=1024**2, fsync="never", journal=False
    )
    # A child without a table of its own takes its parent's settings.
    assert config.queue_config("jobs+mirror") == config.queue_config("jobs")
    # A queue whose name merely starts like another does not inherit from it.
    assert config.queue_config("jobs2") == base


def test_child_of_a_parent_without_overrides_gets_the_default(tmp_path):
    config = load_text(tmp_path, '[queues."logs+copy"]\njournal = false\n')
    assert config.queue_config("logs") == QueueConfig()
    assert config.queue_config("logs+copy") == QueueConfig(journal=False)


def test_queue_config_keeps_nothing_per_name(tmp_path):
    """Resolved on each call (a queue's creation, a reload): a cache of every name ever
    made outlived the queues. A name without overrides shares the default's object."""
    config = load_text(tmp_path, INHERITANCE)
    assert config.queue_config("jobs+audit") == config.queue_config("jobs+audit")
    assert config.queue_config("new") is config.default_queue
    for i in range(1_000):
        config.queue_config(f"reply{i}")
    assert not any(isinstance(v, dict) and len(v) >= 1_000 for v in vars(config).values())


def test_queue_tables_may_be_written_inline_or_with_dotted_keys(tmp_path):
    config = load_text(
        tmp_path,
        "[queues]\njobs = { max_items = 5 }\nlogs.journal = false\n'a+b'.fsync = 'always'\n",
    )
    assert config.queue_config("jobs").max_items == 5
    assert config.queue_config("logs").journal is False
    assert config.queue_config("a+b").fsync == "always"


# ---------------------------------------------------------------------------------------------
# Bad configuration: one line naming the file, the line and the key


def test_error_message_format_names_file_line_table_and_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = ["# erq"] + [""] * 9 + ["[queues.jobs]", "max_items = -5"]
    (tmp_path / "erq.toml").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as info:
        load_config("erq.toml", env={})
    assert str(info.value) == (
        "erq.toml line 12: [queues.jobs] max_items: expected a non-negative integer, got -5"
    )
    assert (info.value.source, info.value.line) == ("erq.toml", 12)
    assert info.value.key == "[queues.jobs] max_items"


BAD_FILES = [
    # (description, text, line, fragments of the message after "<path> line <n>: ")
    ("unknown server key", '[server]\nhost = "h"\nprot = 1\n', 3, ["[server] prot", "port"]),
    (
        "unknown queue option",
        "[queues.default]\njournal = true\n\n[queues.jobs]\nmax_item = 5\n",
        5,
        ["[queues.jobs] max_item", "unknown key"],
    ),
    (
        "queue key in the server table",
        "\n[server]\nmax_items = 5\n",
        3,
        ["[server] max_items", "queue setting"],
    ),
    (
        "server key in a queue table",
        "[queues.default]\nport = 5\n",
        2,
        ["[queues.default] port", "server setting"],
    ),
    ("unknown table", "[server]\nport = 1\n[servers]\nport = 2\n", 3, ["[servers]", "unknown"]),
    ("top-level key", "# hi\nport = 1\n", 2, ["port", "not in a table"]),
    ("string for a bool", '[queues.default]\njournal = "yes"\n', 2, ["journal", '"yes"']),
    ("float for a size", "[queues.default]\n\nmax_size = 1.5\n", 3, ["max_size", "1.5"]),
    ("string for an int", '[server]\nport = "22133"\n', 2, ["[server] port", '"22133"']),
    ("negative size", "[server]\nmax_item_size = -1\n", 2, ["max_item_size", "-1"]),
    ("negative size string", '[queues.x]\nmax_size = "-1KiB"\n', 2, ["max_size", "non-negative"]),
    ("negative duration", "[queues.x]\nmax_age = -10\n", 2, ["max_age", "-10"]),
    ("unknown size unit", '[queues.x]\nmax_size = "5MB"\n', 2, ["max_size", '"MB"']),
    ("fsync zero", "[queues.x]\nfsync = 0\n", 2, ["[queues.x] fsync", "always"]),
    ("fsync zero ms", '[queues.x]\nfsync = "0ms"\n', 2, ["fsync"]),
    ("fsync word", '[queues.x]\nfsync = "sometimes"\n', 2, ["fsync", '"sometimes"']),
    ("fsync bool", "[queues.x]\nfsync = true\n", 2, ["fsync"]),
    ("bad compat", '[server]\ncompat = "memcached"\n', 2, ["[server] compat", '"memcached"']),
    ("port too large", "[server]\nport = 65536\n", 2, ["[server] port", "65536"]),
    ("negative admin port", "[server]\nadmin_port = -1\n", 2, ["admin_port"]),
    ("max_line too small", "[server]\nmax_line = 100\n", 2, ["max_line", "1024"]),
    ("max_line too large", '[server]\nmax_line = "1TiB"\n', 2, ["max_line", "at most 64MiB"]),
    ("max_line just over", "[server]\nmax_line = 67108865\n", 2, ["max_line", "67108864"]),
    ("max_open_reads zero", "[server]\nmax_open_reads = 0\n", 2, ["max_open_reads"]),
    ("max_connections zero", "[server]\nmax_connections = 0\n", 2, ["max_connections"]),
    ("max_queues zero", "[server]\nmax_queues = 0\n", 2, ["max_queues"]),
    ("expiry_sweep zero", "[server]\nexpiry_sweep = 0\n", 2, ["expiry_sweep", "positive"]),
    ("client_timeout zero", "[server]\nclient_timeout = '0s'\n", 2, ["client_timeout"]),
    ("tcp_keepalive zero", "[server]\ntcp_keepalive = 0\n", 2, ["tcp_keepalive", "1000 ms"]),
    ("tcp_keepalive under 1s", "[server]\ntcp_keepalive = '999ms'\n", 2, ["tcp_keepalive"]),
    ("tcp_keepalive too long", "[server]\ntcp_keepalive = '32768s'\n", 2, ["32767s"]),
    ("open_timeout zero", "[queues.x]\nopen_timeout = 0\n", 2, ["open_timeout"]),
    ("empty host", '[server]\nhost = ""\n', 2, ["[server] host"]),
    ("NUL in host", '[server]\nhost = "127.0.0.1\\u0000x"\n', 2, ["[server] host", "NUL"]),
    ("NUL in data_dir", '[server]\ndata_dir = "d\\u0000x"\n', 2, ["[server] data_dir", "NUL"]),
    ("none for a required key", '[queues.x]\nmax_memory_size = "none"\n', 2, ["max_memory"]),
    ("none for a required server key", '[server]\nexpiry_sweep = "none"\n', 2, ["expiry"]),
    ("bad expire_to_queue", '[queues.x]\nexpire_to_queue = "a/b"\n', 2, ["expire_to_queue"]),
    ("dot in queue name", '# x\n[queues."a.b"]\njournal = true\n', 2, ['[queues."a.b"]']),
    ("slash in queue name", '[queues."a/b"]\n', 1, ['[queues."a/b"]', "queue name"]),
    ("space in queue name", '[queues."a b"]\n', 1, ["queue name"]),
    ("tilde in queue name", "[queues.'a~b']\n", 1, ["queue name"]),
    ("two plus signs", '[queues."a+b+c"]\n', 1, ["'+'"]),
    ("leading plus", '[queues."+a"]\n', 1, ["'+'"]),
    ("trailing plus", '[queues."a+"]\n', 1, ["'+'"]),
    ("empty queue name", '[queues.""]\n', 1, ["empty"]),
    ("non-ASCII queue name", '[queues."caf\u00e9"]\n', 1, ["ASCII"]),
    ("control char in name", '[queues."a\\tb"]\n', 1, ["queue name"]),
    ("queue name over 250", f"[queues.{'q' * 251}]\n", 1, ["251 bytes"]),
    ("queue not a table", "[queues]\njobs = 5\n", 2, ["[queues.jobs]", "table"]),
    ("server not a table", "server = 5\n", 1, ["[server]", "expected a table"]),
    ("array of tables", "[server]\n[[queues.jobs]]\n", 2, ["[queues.jobs]", "array"]),
    ("syntax error", "[server]\nport = 1\nhost = \n", 3, ["TOML syntax error at column"]),
    ("duplicate key", "[server]\nport = 1\nport = 2\n\n", 3, ["TOML syntax error"]),
    ("unclosed header", "[server]\n[queues.x\nmax_items = 1\n", 2, ["TOML syntax error"]),
]


@pytest.mark.parametrize(
    ("text", "line", "fragments"),
    [case[1:] for case in BAD_FILES],
    ids=[case[0] for case in BAD_FILES],
)
def test_bad_config_names_the_key_and_its_line(tmp_path, text, line, fragments):
    path, error = config_error(tmp_path, text)
    message = str(error)
    assert message.startswith(f"{path} line {line}: "), message
    assert error.line == line
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


LOCATED = [
    # Lines are found past multi-line strings, arrays, quoted and spaced headers, dotted keys.
    (
        "multi-line string that looks like tables",
        '[server]\nhost = """\n[queues.x]\nmax_items = -1\n"""\nport = -1\n',
        6,
        "[server] port",
    ),
    (
        "literal multi-line string",
        "[server]\ndata_dir = '''\nport = 5\n'''\n\nport = 1e3\n",
        6,
        "[server] port",
    ),
    (
        "array spanning lines",
        "[queues.x]\nbogus = [\n  1,\n  ']',\n]\n",
        2,
        "[queues.x] bogus",
    ),
    (
        "key after an array spanning lines",
        "[queues.x]\njournal = true\n\n\nfsync = [\n 1, # ]\n 2,\n]\n",
        5,
        "[queues.x] fsync",
    ),
    (
        "quoted and spaced header",
        '[server]\n\n[ queues . "a+b" ]\n  max_items = 1\n  journal = 3\n',
        5,
        '[queues."a+b"] journal',
    ),
    (
        "dotted key under [queues]",
        "[queues]\njobs.max_items = 1\njobs.max_size = -2\n",
        3,
        "[queues.jobs] max_size",
    ),
    (
        "dotted key at top level",
        '\n\nqueues.jobs.fsync = "soon"\n',
        3,
        "[queues.jobs] fsync",
    ),
    (
        "key in an inline table",
        "[queues]\nother = {}\njobs = { journal = true, max_items = -1 }\n",
        3,
        "[queues.jobs] max_items",
    ),
    (
        "same key name in an earlier table",
        "[queues.a]\nmax_items = 1\n\n[queues.b]\nmax_items = -1\n",
        5,
        "[queues.b] max_items",
    ),
    (
        "escaped quote in a string",
        '[server]\nhost = "a\\"b # c"\n[queues.x]\njournal = 1\n',
        4,
        "[queues.x] journal",
    ),
    (
        "windows line endings",
        "[server]\r\nport = 1\r\n\r\nhost = 5\r\n",
        4,
        "[server] host",
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [case[1:] for case in LOCATED],
    ids=[case[0] for case in LOCATED],
)
def test_error_line_is_found_in_any_toml_layout(tmp_path, text, line, key):
    path, error = config_error(tmp_path, text)
    assert str(error).startswith(f"{path} line {line}: {key}: "), str(error)


def test_syntax_error_reports_tomllibs_line_and_column(tmp_path):
    path, error = config_error(tmp_path, "[server]\nport = 1\nhost = ?\n")
    assert str(error) == f"{path} line 3: TOML syntax error at column 8: Invalid value"


def test_syntax_error_at_end_of_file_names_the_last_line(tmp_path):
    path, error = config_error(tmp_path, '[server]\nhost = "x\n\n')
    assert error.line == 2
    assert "TOML syntax error" in str(error)


def test_missing_file_names_the_path(tmp_path):
    path = str(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match=rf"^{re.escape(path)}: cannot read the config file"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match=re.escape(path)):
        load_config(env={"ERQ_CONFIG": path})


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "erq.toml"
    path.write_bytes(b'[server]\nhost = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    assert str(info.value) == f"{path} line 2: not valid UTF-8"


# ---------------------------------------------------------------------------------------------
# The example file


def test_example_file_loads_to_exactly_the_defaults():
    config = load_config(str(EXAMPLE), env={})
    assert config.server == ServerConfig()
    assert config.default_queue == QueueConfig()
    assert dict(config.queue_overrides) == {}


def test_example_file_sets_every_key_explicitly():
    text = EXAMPLE.read_text()
    server, _, queues = text.partition("[queues.default]")
    for setting in fields(ServerConfig):
        assert re.search(rf"^{setting.name} = ", server, re.MULTILINE), setting.name
    for setting in fields(QueueConfig):
        assert re.search(rf"^{setting.name} = ", queues, re.MULTILINE), setting.name


def test_example_file_commented_queues_load_when_uncommented(tmp_path):
    text = EXAMPLE.read_text()
    start = text.index('# [queues."jobs"]')
    examples = re.sub(r"^# (\[.*\]|\w+ = .*)$", r"\1", text[start:], flags=re.MULTILINE)
    config = load_text(tmp_path, text[:start] + examples)
    jobs = config.queue_config("jobs")
    assert jobs.fsync == "always"
    assert jobs.expire_to_queue == "jobs_expired"
    audit = config.queue_config("jobs+audit")
    assert audit.journal is False
    assert audit.open_timeout == jobs.open_timeout == 300_000  # inherited from the parent


# ---------------------------------------------------------------------------------------------
# Reload


def test_restart_required_lists_changed_listener_and_data_dir_keys(tmp_path):
    old = load_config(env={})
    assert old.restart_required(load_config(env={})) == []
    new = load_config(cli={"port": 1, "host": "0.0.0.0", "admin_port": 0, "data_dir": "/d"}, env={})
    assert old.restart_required(new) == ["host", "port", "admin_port", "data_dir"]
    assert old.restart_required(load_config(cli={"data_dir": "/d"}, env={})) == ["data_dir"]


def test_restart_not_required_for_live_settings(tmp_path):
    old = load_config(env={})
    new = load_text(
        tmp_path,
        '[server]\nmax_connections = 5\ncompat = "kestrel"\nclient_timeout = 10\n'
        "[queues.default]\nmax_items = 1\n",
    )
    assert old.restart_required(new) == []
