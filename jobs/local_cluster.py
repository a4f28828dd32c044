"""`moref-index cluster start|stop`: a Ray head of its own on this machine, for `ray job submit`.

A head started with Ray's defaults collides with everything else Ray does on the machine: every
later `ray.init()` finds it in /tmp/ray and joins it, its fixed ports (the dashboard agent's 52365,
the client server's 10001, ...) clash with a second Ray, a token a local run left in
~/.ray/auth_token turns authentication on without saying where the token is, and `ray stop` stops
every Ray process of the machine. This head has instead:

- its own short temp dir (Ray's Unix sockets live under it and have a length limit), which no
  other `ray.init()` looks in, and which names the head for `cluster stop`;
- every port it listens on picked free on loopback;
- its own token (`<temp dir>/auth_token`, token authentication on), which `ray job submit` is
  given through RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH on its command line only;
- an environment without the caller's RAY_* variables;
- its own process group: `cluster stop` ends that group's processes (and any that left it but run
  from its temp dir), nothing else, then deletes the temp dir.

`<temp dir>/head.json` records what `stop` needs and what `start` printed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

STATE_FILE = "head.json"
TOKEN_FILE = "auth_token"
TEMP_PREFIX = "moref-rh-"
START_ATTEMPTS = 2  # a start that times out is tried once more, in a fresh temp dir on fresh ports
# `ray start` gives the raylet a fixed 30 s to register after the dashboard came up within
# RAY_DASHBOARD_STARTUP_TIMEOUT_S (60 s by default): on a loaded machine the latter is raised.
START_TIMEOUT_S = 180
PORT_NAMES = ("gcs", "dashboard", "metrics", "agent_http", "agent_grpc", "runtime_env_agent", "node_manager",
              "object_manager", "client_server", "dashboard_metrics", "autoscaler_metrics")


class HeadError(RuntimeError):
    """The head did not start, or the folder names no head of this command."""


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held together while picked, so none repeats)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def ray_executable() -> str:
    """The `ray` of this interpreter's environment (the one whose packages the jobs need)."""
    return str(pathlib.Path(sys.executable).parent / "ray")


@dataclasses.dataclass
class LocalHead:
    temp_dir: pathlib.Path
    ports: dict[str, int]
    pgid: int | None = None  # the process group `ray start` led, with every daemon in it
    output: str = ""  # what `ray start` printed

    @classmethod
    def new(cls) -> LocalHead:
        temp_dir = pathlib.Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir="/tmp"))
        token = temp_dir / TOKEN_FILE
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        return cls(temp_dir, dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)))))

    @classmethod
    def load(cls, temp_dir: str | pathlib.Path) -> LocalHead:
        path = pathlib.Path(temp_dir) / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise HeadError(f"{temp_dir} holds no head started by `moref-index cluster start` (no {STATE_FILE})") \
                from None
        return cls(pathlib.Path(temp_dir), state["ports"], state["pgid"])

    @property
    def address(self) -> str:
        """The dashboard's address, which `ray job submit --address` takes."""
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    @property
    def token_path(self) -> pathlib.Path:
        return self.temp_dir / TOKEN_FILE

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}/metrics"

    def env(self) -> dict[str, str]:
        """The environment of the head and of a `ray job submit` to it."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # never the caller's Ray
        return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    def submit_prefix(self) -> str:
        """The start of the `ray job submit` command line for this head, as a shell line."""
        return (f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={shlex.quote(str(self.token_path))} "
                f"{shlex.quote(ray_executable())} job submit --address {self.address}")

    def start(self, num_cpus: int | None = None, timeout_s: float = START_TIMEOUT_S) -> None:
        """`ray start --head` in a process group of its own; HeadError with its output when it fails."""
        p = self.ports
        cmd = [ray_executable(), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(p["gcs"]),
               "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(p["dashboard"]),
               "--metrics-export-port", str(p["metrics"]), "--dashboard-agent-listen-port", str(p["agent_http"]),
               "--dashboard-agent-grpc-port", str(p["agent_grpc"]), "--runtime-env-agent-port",
               str(p["runtime_env_agent"]), "--node-manager-port", str(p["node_manager"]), "--object-manager-port",
               str(p["object_manager"]), "--ray-client-server-port", str(p["client_server"]),
               "--temp-dir", str(self.temp_dir), "--disable-usage-stats", "--log-style", "record"]
        if num_cpus is not None:
            cmd += ["--num-cpus", str(num_cpus)]
        env = {**self.env(), "RAY_DASHBOARD_STARTUP_TIMEOUT_S": str(int(timeout_s)),
               "RAY_gcs_server_port_wait_time_s": str(int(timeout_s)),
               # the raylet's wait for the dashboard agent (its port file), 30 s by default
               "RAY_agent_register_timeout_ms": str(int(timeout_s * 1000)),
               # the dashboard's and the autoscaler's own metrics servers (fixed ports by default)
               "DASHBOARD_METRIC_PORT": str(p["dashboard_metrics"]),
               "AUTOSCALER_METRIC_PORT": str(p["autoscaler_metrics"])}
        log = self.temp_dir / "ray-start.log"
        started = time.monotonic()
        with log.open("w") as out:  # a file, not a pipe: the head's daemons outlive `ray start`
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.pgid = proc.pid
        self._save()  # before waiting: a start that hangs can still be stopped
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout_s + 60)
        self.output = log.read_text() + f"\n(ray start: exit status {proc.returncode} after " \
                                        f"{time.monotonic() - started:.1f} s)"
        if proc.returncode != 0:
            raise HeadError(f"ray start --head failed:\n{self.output[-4000:]}")

    def _save(self) -> None:
        state = {"pgid": self.pgid, "ports": self.ports, "address": self.address,
                 "token_path": str(self.token_path), "metrics": self.metrics_url}
        (self.temp_dir / STATE_FILE).write_text(json.dumps(state, indent=2))

    def processes(self) -> list[int]:
        """The head's processes: its process group when one of them runs from its temp dir (a
        group id alone may have been reused), and any that left the group but run from there."""
        group, own = [], []
        for entry in pathlib.Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
                pgid = os.getpgid(int(entry.name))
            except (OSError, ProcessLookupError):
                continue
            if pgid == self.pgid:
                group.append(int(entry.name))
            if str(self.temp_dir) in cmdline:
                own.append(int(entry.name))
        return sorted(set(own) | (set(group) if set(group) & set(own) else set()))

    def stop(self, remove: bool = True) -> int:
        """End the head's processes (TERM, then KILL); with `remove`, delete its temp dir. Returns
        how many processes there were."""
        found = len(self.processes())
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            for pid in self.processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.2)
        if remove:
            import shutil

            shutil.rmtree(self.temp_dir, ignore_errors=True)
        return found

    def logs(self, lines: int = 40) -> str:
        """`ray start`'s output and the tail of each log of the head's session."""
        parts = [f"--- ray start ---\n{self.output[-4000:]}"]
        session = self.temp_dir / "session_latest" / "logs"
        if session.is_dir():
            for path in sorted(session.iterdir()):
                if path.is_file() and path.stat().st_size and path.suffix in (".log", ".err", ".out"):
                    tail = path.read_text(errors="replace").splitlines()[-lines:]
                    parts.append(f"--- {path.name} ---\n" + "\n".join(tail))
        return "\n".join(parts)

    def describe(self) -> str:
        """What `cluster start` prints: where the head is, how to submit to it and stop it."""
        return "\n".join([
            f"Ray head started: {self.temp_dir}",
            f"  address (dashboard, for ray job submit): {self.address}",
            f"  metrics: {self.metrics_url}",
            f"  token: {self.token_path}",
            "submit a job with:",
            f"  {self.submit_prefix()} --working-dir . -- \\",
            f"      {shlex.quote(sys.executable)} -m jobs.cli run CONFIG.yaml --set output.path=ABSOLUTE_OUTPUT",
            "stop this head (and nothing else) with:",
            f"  {shlex.quote(str(pathlib.Path(sys.executable).parent / 'moref-index'))} cluster stop {self.temp_dir}",
        ])

    def shell_variables(self) -> str:
        """`cluster start --shell`: shell assignments for a script to `eval`."""
        values = {"HEAD_DIR": str(self.temp_dir), "HEAD_ADDRESS": self.address, "HEAD_TOKEN": str(self.token_path),
                  "HEAD_METRICS": self.metrics_url}
        return "\n".join(f"{name}={shlex.quote(value)}" for name, value in values.items())


def start_head(num_cpus: int | None = None, attempts: int = START_ATTEMPTS,
               report=lambda text: print(text, file=sys.stderr)) -> LocalHead:
    """A started LocalHead; a failed start is reported (its output and logs), stopped and tried
    again, up to `attempts` times; HeadError after the last."""
    for attempt in range(1, attempts + 1):
        head = LocalHead.new()
        try:
            head.start(num_cpus=num_cpus)
            return head
        except HeadError:
            report(f"ray start --head failed (attempt {attempt} of {attempts}):\n{head.logs()}")
            head.stop()
    raise HeadError(f"ray start --head failed {attempts} times; its output and logs are above")
