"""`keras-parallel launch` on tiny TensorFlow-free worker scripts.

The launcher runs as `python -m keras_parallel launch` in a subprocess, except
for the argument checks, which never get as far as starting a worker.
"""

import fcntl
import json
import os
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from keras_parallel import launch, worker_process
from keras_parallel.cli import main

# Longer than any test's timeout: a worker that sleeps this long and is gone
# by the end of a test was stopped by the launcher.
LONG_SLEEP = 120
LAUNCHER = [sys.executable, "-m", "keras_parallel", "launch"]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def write_script(tmp_path, code: str) -> str:
    path = tmp_path / "worker.py"
    path.write_text(textwrap.dedent(code))
    return str(path)


def run_launcher(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*LAUNCHER, *argv],
        capture_output=True,
        encoding="utf-8",
        timeout=60,
        env=ENV,
    )


def free_port_pair() -> int:
    """A port P such that P and P + 1 are both free on 127.0.0.1."""
    for _ in range(100):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port == 65535:
                continue
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two consecutive free ports")


def assert_gone(pid: int) -> None:
    """Fails unless process `pid` has exited (and been reaped) within 10 s."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    pytest.fail(f"worker {pid} outlived the launcher")


def test_tf_config_names_every_worker_and_this_task():
    assert launch.tf_config(3, 2, [5000, 5001, 6000]) == {
        "cluster": {"worker": ["127.0.0.1:5000", "127.0.0.1:5001", "127.0.0.1:6000"]},
        "task": {"type": "worker", "index": 2},
    }


@pytest.mark.parametrize(
    "num_workers, index, ports, message",
    [
        (2, 0, [5000], "need 2 ports, got 1"),
        (2, 2, [5000, 5001], r"index must be in \[0, 2\), got 2"),
        (2, -1, [5000, 5001], r"index must be in \[0, 2\), got -1"),
    ],
)
def test_tf_config_rejects_inconsistent_arguments(num_workers, index, ports, message):
    with pytest.raises(ValueError, match=message):
        launch.tf_config(num_workers, index, ports)


def test_launcher_module_does_not_import_tensorflow():
    code = (
        "import importlib.util, sys; "
        "spec = importlib.util.spec_from_file_location('launch', sys.argv[1]); "
        "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'keras', 'numpy')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, launch.__file__],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_each_worker_gets_its_own_tf_config(tmp_path):
    script = write_script(
        tmp_path,
        """
        import json, os
        config = json.loads(os.environ["TF_CONFIG"])
        print(json.dumps(config), os.environ["PYTHONUNBUFFERED"])
        """,
    )
    result = run_launcher("-n", "3", script)
    assert result.returncode == 0, result.stderr
    configs = {}
    for line in result.stdout.splitlines():
        match = re.fullmatch(r"\[worker (\d)\] (\{.*\}) 1", line)
        assert match, line
        configs[int(match[1])] = json.loads(match[2])
    assert sorted(configs) == [0, 1, 2]
    cluster = configs[0]["cluster"]
    workers = cluster["worker"]
    assert len(set(workers)) == 3
    assert all(re.fullmatch(r"127\.0\.0\.1:\d+", worker) for worker in workers)
    for index, config in configs.items():
        assert config == {
            "cluster": cluster,
            "task": {"type": "worker", "index": index},
        }


def test_port_gives_consecutive_ports(tmp_path):
    script = write_script(
        tmp_path,
        """
        import json, os
        print(json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"])
        """,
    )
    port = free_port_pair()
    result = run_launcher("-n", "2", "--port", str(port), script)
    assert result.returncode == 0, result.stderr
    expected = str([f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"])
    assert sorted(result.stdout.splitlines()) == [
        f"[worker 0] {expected}",
        f"[worker 1] {expected}",
    ]


def test_port_in_use_is_refused_before_any_worker_starts(tmp_path):
    marker = tmp_path / "started"
    script = write_script(tmp_path, f"open({str(marker)!r}, 'w').close()\n")
    port = free_port_pair()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port + 1))
        busy.listen()
        result = run_launcher(
            "-n", "2", "--network", "host", "--port", str(port), script
        )
    assert result.returncode == 2
    assert (
        f"keras-parallel launch: port {port + 1} (worker 1) on 127.0.0.1 is in use"
        in result.stderr
    )
    assert "--port" in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("port", ["0", "65535", "-3"])
def test_port_out_of_range_is_refused(tmp_path, capsys, port):
    script = write_script(tmp_path, "raise SystemExit('must not run')\n")
    assert main(["launch", "-n", "2", "--port", port, script]) == 2
    assert (
        f"--port must be between 1 and 65534 for 2 worker(s) (worker i uses "
        f"port + i), got {port}." in capsys.readouterr().err
    )


def test_zero_workers_is_refused(tmp_path, capsys):
    script = write_script(tmp_path, "raise SystemExit('must not run')\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["launch", "-n", "0", script])
    assert exit_info.value.code == 2
    assert "--num-workers: must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="num_workers must be >= 1, got 0"):
        launch.launch(script, num_workers=0)


def test_missing_script_is_refused(tmp_path):
    missing = tmp_path / "no_such_script.py"
    result = run_launcher(str(missing))
    assert result.returncode == 2
    assert f"script {str(missing)!r} does not exist" in result.stderr


def test_output_is_prefixed_per_worker_and_stream(tmp_path):
    script = write_script(
        tmp_path,
        """
        import json, os, sys
        index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
        print(f"out {index}", sys.argv[1:])
        print(f"err {index}", file=sys.stderr)
        sys.stdout.buffer.write(b"bad \\xff byte\\n")
        sys.stdout.write("no newline")
        """,
    )
    result = run_launcher("-n", "2", script, "--epochs", "3", "-n", "5")
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == [
        "[worker 0] bad \ufffd byte",
        "[worker 0] no newline",
        "[worker 0] out 0 ['--epochs', '3', '-n', '5']",
        "[worker 1] bad \ufffd byte",
        "[worker 1] no newline",
        "[worker 1] out 1 ['--epochs', '3', '-n', '5']",
    ]
    assert sorted(result.stderr.splitlines()) == [
        "[worker 0] err 0",
        "[worker 1] err 1",
    ]


# Worker 1 runs until stopped; worker 0 waits for it to be up, then fails.
STOP_SCRIPT = """
import json, os, pathlib, signal, sys, time
index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
pids = pathlib.Path(sys.argv[1])
if index == 1:
    # Written whole, then renamed: worker 0 acts as soon as the file exists.
    partial = pids.with_suffix(".partial")
    partial.write_text(str(os.getpid()))
    partial.rename(pids)
    time.sleep({sleep})
else:
    while not pids.exists():
        time.sleep(0.05)
    {fail}
"""


@pytest.mark.parametrize(
    "fail, code, message",
    [
        ("sys.exit(3)", 3, "worker 0 exited with code 3"),
        ("os.kill(os.getpid(), signal.SIGKILL)", 137, "worker 0 was killed by SIGKILL"),
    ],
)
def test_a_failing_worker_stops_the_others(tmp_path, fail, code, message):
    script = write_script(tmp_path, STOP_SCRIPT.format(sleep=LONG_SLEEP, fail=fail))
    pid_file = tmp_path / "pid"
    # Worker 1 sleeps past run_launcher's timeout: the launcher returns only
    # because it stopped it.
    result = run_launcher("-n", "2", script, str(pid_file))
    assert result.returncode == code, result.stderr
    assert (
        f"keras-parallel launch: {message}; stopping the other workers."
        in result.stderr
    )
    assert_gone(int(pid_file.read_text()))


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_to_the_launcher_are_forwarded(tmp_path, signum, code):
    script = write_script(
        tmp_path,
        f"""
        import signal, sys, time

        def on_sigterm(signum, frame):
            print("got SIGTERM")
            sys.exit(0)

        signal.signal(signal.SIGTERM, on_sigterm)
        try:
            print("ready")
            time.sleep({LONG_SLEEP})
        except KeyboardInterrupt:
            print("got SIGINT")
        """,
    )
    launcher = subprocess.Popen(
        [*LAUNCHER, "-n", "2", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        encoding="utf-8",
        env=ENV,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(
        target=lambda: [lines.put(line) for line in launcher.stdout], daemon=True
    )
    reader.start()
    try:
        ready = set()
        deadline = time.monotonic() + 60
        while ready != {"[worker 0] ready\n", "[worker 1] ready\n"}:
            ready.add(lines.get(timeout=max(deadline - time.monotonic(), 0.01)))
        launcher.send_signal(signum)
        launcher.wait(timeout=30)
        reader.join(timeout=10)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    stderr = launcher.stderr.read()
    launcher.stderr.close()
    assert launcher.returncode == code, stderr
    name = signal.Signals(signum).name
    assert sorted(lines.queue) == [
        f"[worker 0] got {name}\n",
        f"[worker 1] got {name}\n",
    ]


def private_network_unavailable() -> str:
    """Why no private network can be made here ('' when one can)."""
    try:
        worker_process.PrivateNetwork().close()
    except OSError as error:
        return str(error)
    return ""


def test_a_busy_port_of_this_host_does_not_matter_in_the_private_network(tmp_path):
    if reason := private_network_unavailable():
        pytest.skip(f"no private network here: {reason}")
    script = write_script(tmp_path, "print('ran')\n")
    port = free_port_pair()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port + 1))
        busy.listen()
        result = run_launcher("-n", "2", "--port", str(port), script)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == ["[worker 0] ran", "[worker 1] ran"]


SIOCGIFADDR = 0x8915


def this_hosts_other_address() -> str | None:
    """An IPv4 address of this machine that is not loopback, or None."""
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            request = struct.pack("256s", name.encode()[:15])
            try:
                answer = fcntl.ioctl(sock, SIOCGIFADDR, request)
            except OSError:  # an interface without an IPv4 address
                continue
        address = socket.inet_ntoa(answer[20:24])
        if not address.startswith("127."):
            return address
    return None


# A worker whose TensorFlow gRPC server listens (on every interface, whatever
# TF_CONFIG names) until the test creates the file named by argv[1].
SERVER_SCRIPT = """
import json, os, sys, time
import tensorflow as tf
config = json.loads(os.environ["TF_CONFIG"])
server = tf.distribute.Server(
    tf.train.ClusterSpec(config["cluster"]),
    job_name="worker",
    task_index=config["task"]["index"],
)
print("listening", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.1)
"""


def connect_to_workers(tmp_path, network: str) -> tuple[list[bool], str]:
    """Starts 2 TensorFlow workers and tries each one's port from this host's
    non-loopback address: True where the connection was accepted."""
    address = this_hosts_other_address()
    if address is None:
        pytest.skip("this machine has no address but loopback")
    tmp_path.mkdir()
    script = write_script(tmp_path, SERVER_SCRIPT)
    release = tmp_path / "release"
    launcher = subprocess.Popen(
        [*LAUNCHER, "-n", "2", "--network", network, script, str(release)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        encoding="utf-8",
        env=ENV,
    )
    try:
        lines = [launcher.stdout.readline() for _ in range(2)]
        assert sorted(lines) == ["[worker 0] listening\n", "[worker 1] listening\n"]
        ports = [int(worker.rsplit(":", 1)[1]) for worker in workers_of(launcher)]
        accepted = []
        for port in ports:
            with socket.socket() as sock:
                sock.settimeout(5)
                accepted.append(sock.connect_ex((address, port)) == 0)
        release.touch()
        _, stderr = launcher.communicate(timeout=30)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode == 0, stderr
    return accepted, stderr


def workers_of(launcher: subprocess.Popen) -> list[str]:
    """The workers' addresses, read from /proc (the workers print nothing else)."""
    children = subprocess.run(
        ["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True
    ).stdout.split()
    environ = open(f"/proc/{children[0]}/environ", "rb").read().split(b"\0")
    config = next(v for v in environ if v.startswith(b"TF_CONFIG="))
    return json.loads(config.split(b"=", 1)[1])["cluster"]["worker"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux namespaces")
def test_workers_servers_are_unreachable_from_other_hosts(tmp_path):
    if reason := private_network_unavailable():
        pytest.skip(f"no private network here: {reason}")
    accepted, stderr = connect_to_workers(tmp_path / "private", "private")
    assert accepted == [False, False]
    assert "keras-parallel launch: WARNING" not in stderr
    # The same workers on the host's network: TensorFlow's servers accept
    # connections from the machine's address, which is what the private
    # network prevents.
    accepted, stderr = connect_to_workers(tmp_path / "host", "host")
    assert accepted == [True, True]
    assert "listen on ALL network interfaces, ports" in stderr


def test_without_a_private_network_a_warning_names_the_open_ports(
    tmp_path, monkeypatch, capsys
):
    def refused():
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(launch, "PrivateNetwork", refused)
    script = write_script(tmp_path, "print('ran')\n")
    port = free_port_pair()
    assert launch.launch(script, num_workers=2, port=port) == 0
    err = capsys.readouterr().err
    assert err.startswith(
        "keras-parallel launch: WARNING: no private network could be made "
        "([Errno 1] Operation not permitted), so the workers' TensorFlow servers "
        f"listen on ALL network interfaces, ports {port}, {port + 1}."
    )
    assert "firewall" in err and "README, 'Security'" in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG")
@pytest.mark.parametrize("network", ["private", "host"])
def test_workers_stop_when_the_launcher_is_killed(tmp_path, network):
    script = write_script(
        tmp_path,
        f"""
        import json, os, sys, time
        index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
        print(os.getpid(), flush=True)
        time.sleep({LONG_SLEEP})
        """,
    )
    launcher = subprocess.Popen(
        [*LAUNCHER, "-n", "2", "--network", network, script],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        encoding="utf-8",
        env=ENV,
    )
    try:
        pids = [int(launcher.stdout.readline().split()[-1]) for _ in range(2)]
    finally:
        launcher.kill()
        launcher.wait()
    for pid in pids:
        assert_gone(pid)


def test_unknown_network_is_refused(tmp_path, capsys):
    script = write_script(tmp_path, "raise SystemExit('must not run')\n")
    with pytest.raises(
        ValueError, match="network must be one of 'private', 'host', got 'lan'"
    ):
        launch.launch(script, network="lan")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux namespaces")
def test_a_worker_that_cannot_join_the_private_network_says_so(tmp_path):
    # A descriptor that is no namespace: setns refuses it as a sandbox would.
    script = write_script(tmp_path, "raise SystemExit('must not run')\n")
    with open(script) as not_a_namespace:
        result = subprocess.run(
            [sys.executable, "-m", "keras_parallel.worker_process"]
            + [str(os.getpid()), str(not_a_namespace.fileno()), script],
            pass_fds=[not_a_namespace.fileno()],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "keras-parallel launch: a worker could not join the workers' private "
        "network (Invalid argument). Run with --network host (see README, "
        "'Security', for what that exposes)."
    )


def test_a_worker_that_needs_the_internet_is_told_why_it_failed(tmp_path):
    if reason := private_network_unavailable():
        pytest.skip(f"no private network here: {reason}")
    # What `keras.datasets` does first: look up the download host's name.
    script = write_script(
        tmp_path,
        """
        import socket
        socket.getaddrinfo("storage.googleapis.com", 443)
        """,
    )
    result = run_launcher("-n", "2", script)
    assert result.returncode == 1
    assert result.stderr.rstrip().endswith(
        "keras-parallel launch: a worker could not reach the network. The workers "
        "share a private network with loopback only (README, 'Security'): "
        "download what the script needs before launching, or run with "
        "--network host."
    ), result.stderr
    # A script failing for another reason gets no such hint.
    other = write_script(tmp_path, "raise SystemExit('plain failure')\n")
    assert "could not reach the network" not in run_launcher(other).stderr
