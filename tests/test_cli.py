"""The command line's own failures: one line on stderr and an exit status, never a traceback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

from conftest import ROOT, free_port


def env_for(impl: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("ERQ_NO_EXTENSIONS", None)
    if impl == "py":
        env["ERQ_NO_EXTENSIONS"] = "1"
    return env


def erq(*args: str, impl: str = "c", **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "erq", *args], text=True, env=env_for(impl), timeout=60, **kw
    )


def test_stats_without_a_server_says_so_in_one_line(impl):
    port = free_port()
    done = erq("stats", "--port", str(port), impl=impl, capture_output=True)
    assert done.returncode == 1
    assert done.stderr.strip() == f"erq stats: 127.0.0.1:{port}: Connection refused"


def test_stats_finds_the_server_as_serve_would_and_prints_plain_stat_lines(
    erq_factory, impl, tmp_path
):
    server = erq_factory()
    c = server.client()
    assert c.set("q", b"x") == b"STORED\r\n"
    c.close()
    config = tmp_path / "erq.toml"
    config.write_text(f"[server]\nport = {server.port}\n")
    env = dict(env_for(impl), ERQ_PORT=str(server.port))
    for args, run_env in (
        (("--port", str(server.port)), env_for(impl)),
        ((), env),  # ERQ_PORT, as erq serve reads it
        (("--config", str(config)), env_for(impl)),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "erq", "stats", *args],
            capture_output=True,
            text=True,
            env=run_env,
            timeout=60,
        )
        assert done.returncode == 0 and done.stderr == "", done
        lines = done.stdout.splitlines()
        assert all(line.startswith("STAT ") for line in lines) and "\r" not in done.stdout
        assert f"STAT pid {server.proc.pid}" in lines and "STAT queue_q_items 1" in lines


def test_stats_with_host_and_port_reads_no_configuration(erq_factory, impl, tmp_path):
    """--host and --port say where the server is in full: a broken $ERQ_CONFIG or ERQ_PORT
    in the environment (another server's, say) does not stop the look."""
    server = erq_factory()
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\n")
    env = dict(env_for(impl), ERQ_CONFIG=str(broken), ERQ_PORT="not a port")
    done = subprocess.run(
        [sys.executable, "-m", "erq", "stats", "--host", "127.0.0.1", "--port", str(server.port)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0 and done.stderr == "", done
    assert f"STAT pid {server.proc.pid}" in done.stdout.splitlines()
    # With one flag only, the rest comes from the configuration, which is then reported.
    done = subprocess.run(
        [sys.executable, "-m", "erq", "stats", "--port", str(server.port)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 2 and "bad configuration" in done.stderr, done


def test_stats_fails_on_a_reply_that_is_not_stats(impl):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def answer(replies: list[bytes]) -> None:
        for reply in replies:
            conn, _ = listener.accept()
            with conn:
                conn.recv(100)
                conn.sendall(reply)

    replies = [b"ERROR\r\n", b"STAT pid 1\r\nSTAT uptime", b"STAT pid 1\r\nVALUE x\r\nEND\r\n"]
    thread = threading.Thread(target=answer, args=(replies,), daemon=True)
    thread.start()
    with listener:
        for reply in replies:
            done = erq("stats", "--port", str(port), impl=impl, capture_output=True)
            assert done.returncode == 1 and done.stdout == "", (reply, done)
            assert done.stderr.startswith(f"erq stats: 127.0.0.1:{port}: not a stats reply: ")
        thread.join(10)


def test_a_bad_log_level_is_refused_and_help_points_to_serve_flags(impl):
    done = erq("serve", "--log-level", "bogus", impl=impl, capture_output=True)
    assert done.returncode == 2 and "invalid choice: 'BOGUS'" in done.stderr, done.stderr
    listed = erq("--help", impl=impl, capture_output=True)
    assert "'erq serve --help' lists them" in " ".join(listed.stdout.split())
    assert "--data-dir" in erq("serve", "--help", impl=impl, capture_output=True).stdout


def test_serve_help_says_erq_config_is_read_and_what_overrides_what(impl):
    """--config said "default: none, embedded defaults", though $ERQ_CONFIG names a file."""
    text = " ".join(erq("serve", "--help", impl=impl, capture_output=True).stdout.split())
    assert "(default: $ERQ_CONFIG; without either, the embedded defaults)" in text, text
    assert "flags override the ERQ_<KEY> environment variables" in text, text
    assert "which override the configuration file" in text, text


def test_journal_dump_into_a_closed_pipe_ends_quietly(erq_factory, impl):
    server = erq_factory()
    c = server.client()
    c.send(b"set q 0 0 3\r\nabc\r\n" * 3000)
    for _ in range(3000):
        c.line()
    server.stop()
    dump = subprocess.Popen(
        [sys.executable, "-m", "erq", "journal", "dump", str(server.data_dir / "q")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env_for(impl),
    )
    assert dump.stdout.readline().startswith(b"# ")
    dump.stdout.close()  # as `| head -1` does
    assert dump.wait(60) == 0
    assert dump.stderr.read() == b""


def test_example_config_prints_the_shipped_file_which_starts_a_server(erq_factory, impl):
    done = erq("example-config", impl=impl, capture_output=True)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout == (ROOT / "erq" / "example.toml").read_text(encoding="utf-8")
    server = erq_factory(config=done.stdout)  # the copy a wheel's user gets is a valid file
    c = server.client()
    c.send(b"set q 0 0 2\r\nok\r\n")
    assert c.line() == b"STORED\r\n"
    c.close()


def test_the_server_does_not_load_modules_only_rare_paths_need(impl):
    """What a server on its embedded defaults imports is RSS it keeps for its whole life (the
    memory bar leaves it ~1 MiB): the config file's parser, the did-you-mean helper, the tree
    removal and the email package (once there for the admin port's Date header) load only
    when used. ``-S``, so that the site's own imports do not hide one of ours."""
    code = (
        "import sys\n"
        "import erq.cli, erq.server, erq.admin, erq.datadir, erq.config\n"
        "erq.config.load_config()\n"
        "rare = {'email', 'tomllib', 'difflib', 'shutil', 'uuid'}\n"
        "print(sorted(rare & set(sys.modules)))\n"
    )
    env = env_for(impl)
    env.pop("ERQ_CONFIG", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *sys.path])
    done = subprocess.run(
        [sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_fatal_signal_leaves_the_servers_stacks_in_its_log(erq_factory):
    """A journal segment truncated under the server (an operator's mistake) makes its next
    append a bus error: the process ends, and its log says so and where, instead of nothing.
    The next start sets the damaged file aside and serves."""
    server = erq_factory()
    client = server.client()
    assert client.set("q", b"x") == b"STORED\r\n"
    (segment,) = (server.data_dir / "q").glob("*.seg")
    os.truncate(segment, 0)
    client.send(b"set q 0 0 1\r\ny\r\n")
    assert server.proc.wait(20) == -signal.SIGBUS
    log = server.read_log()
    assert "Fatal Python error: Bus error" in log
    assert "Current thread" in log or "Thread 0x" in log  # the stacks
    server.stop()
    server.start()
    assert server.client().set("q", b"z") == b"STORED\r\n"
    assert "set aside" in server.read_log()
