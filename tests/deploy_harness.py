"""Harness for tests that need a real (deployment-mode) Flower federation.

Not a test module itself. It drives the shell scripts in ``scripts/deploy/``
(see ``docs/deployment.md``) through ``subprocess``:

    from tests.deploy_harness import start_federation

    with start_federation(state_dir=tmp_path / "fed", num_nodes=2) as fed:
        result = fed.run("/path/to/app", {"num-rounds": 2}, timeout=300)
        assert result.ok, result.output_tail()
        assert fed.unregistered is not None and fed.unregistered.refused
        assert fed.check_refusal("plaintext").refused

The federation runs on 127.0.0.1 with TLS (self-signed CA) and SuperNode
authentication (ECDSA keys registered with ``flwr supernode register``). Every
SuperNode gets ``--node-config "partition-id=I num-partitions=N"``.

Only the standard library is used; the Flower executables are taken from
``flwr_bin`` (default: the folder of ``sys.executable`` if it holds
``flower-superlink``, else whatever the scripts find: REPO/.venv/bin, then PATH).
Run ``python tests/deploy_harness.py APP_DIR`` for a self-check.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "scripts" / "deploy"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


class FederationError(RuntimeError):
    """A deployment script failed; the message holds its output."""


@dataclass
class Refusal:
    """Outcome of starting one SuperNode that the SuperLink should refuse."""

    mode: str  # "unregistered" | "plaintext" | "nokey"
    outcome: str  # "REFUSED" | "ACCEPTED" | "TIMEOUT"
    exit_code: int | None  # the SuperNode's exit code when REFUSED
    reason_lines: list[str]  # error lines from its log (ANSI codes stripped)
    log_text: str  # its whole log (ANSI codes stripped)

    @property
    def refused(self) -> bool:
        return self.outcome == "REFUSED"


@dataclass
class RunResult:
    """Outcome of one ``flwr run``; ``flwr run`` exits 0 even when a run fails,
    so ``status`` comes from ``flwr ls --run-id``."""

    run_id: int | None
    status: str  # e.g. "finished:completed", "finished:failed", "running", "unknown"
    wall_s: float  # wall time of `flwr run --stream` until the final status
    flwr_rc: int | None  # exit code of `flwr run` (None on timeout)
    output: str  # combined stdout+stderr of `flwr run --stream` (ANSI stripped)
    details: dict[str, Any] = field(default_factory=dict)  # the `flwr ls` JSON entry
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"

    def output_tail(self, n: int = 40) -> str:
        return "\n".join(self.output.splitlines()[-n:])


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON escapes are valid TOML
    raise TypeError(f"run_config values must be bool/int/float/str, got {type(v).__name__}")


def _toml_key(k: str) -> str:
    # Dotted keys ("federation.rounds") stay dotted: flwr flattens them back.
    return ".".join(p if _BARE_KEY.match(p) else json.dumps(p) for p in k.split("."))


def write_run_config(path: Path, run_config: dict[str, Any]) -> Path:
    """Write ``run_config`` as a TOML file ``flwr run --run-config FILE`` accepts."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in run_config.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class Federation:
    """A running local federation (see :func:`start_federation`)."""

    def __init__(self, state_dir: Path, num_nodes: int, env: dict[str, str],
                 app_dir: Path | None = None) -> None:
        self.state_dir = state_dir
        self.num_nodes = num_nodes
        self.env = env
        self.app_dir = app_dir
        self.unregistered: Refusal | None = None
        self.start_wall_s: float = 0.0
        self._runs = 0
        self._stopped = False

    # -- info -------------------------------------------------------------
    @property
    def connection(self) -> str:
        return self.env["FLWR_CONNECTION"]

    @property
    def address(self) -> str:
        return self.env["SUPERLINK_ADDRESS"]

    @property
    def node_ids(self) -> list[int]:
        """Registered node ids, node 1..N (they change when a key is rotated)."""
        return [int((self.state_dir / "node_ids" / f"node_{i}").read_text())
                for i in range(1, self.num_nodes + 1)]

    def log(self, name: str) -> str:
        """Text of STATE/logs/NAME.log (e.g. "superlink", "supernode_1")."""
        p = self.state_dir / "logs" / f"{name}.log"
        return _ANSI.sub("", p.read_text(errors="replace")) if p.exists() else ""

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``flwr ARGS`` with this federation's FLWR_HOME."""
        return subprocess.run([self._bin("flwr"), *args], env=self.env, text=True,
                              capture_output=True, timeout=timeout)

    def flwr_json(self, *args: str, timeout: float = 60) -> dict[str, Any]:
        """``flwr ARGS CONNECTION --format json``; raises unless it reports success."""
        cp = self.flwr(*args, self.connection, "--format", "json", timeout=timeout)
        try:
            data = json.loads(cp.stdout)
        except json.JSONDecodeError as err:
            raise FederationError(f"flwr {' '.join(args)}: {cp.stdout}{cp.stderr}") from err
        if not data.get("success"):
            raise FederationError(f"flwr {' '.join(args)}: {data}")
        return data

    def list_nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode list`` entries (node-id, status, ...)."""
        return self.flwr_json("supernode", "list")["nodes"]

    def run_info(self, run_id: int) -> dict[str, Any]:
        """The ``flwr ls --run-id`` entry of one run (has "status")."""
        runs = self.flwr_json("ls", "--run-id", str(run_id))["runs"]
        return runs[0] if runs else {}

    # -- actions ------------------------------------------------------------------
    def run(self, app_dir: str | Path | None = None, run_config: dict[str, Any] | None = None,
            timeout: float = 600, status_timeout: float = 60) -> RunResult:
        """``flwr run APP CONNECTION --stream [--run-config FILE]`` and wait for the
        run's final status. On timeout the run is stopped with ``flwr stop``."""
        app = Path(app_dir or self.app_dir or ".").resolve()
        self._runs += 1
        cmd = [self._bin("flwr"), "run", str(app), self.connection, "--stream"]
        if run_config:
            cfg = write_run_config(self.state_dir / f"run_config_{self._runs}.toml", run_config)
            cmd += ["--run-config", str(cfg)]
        log_path = self.state_dir / "logs" / f"flwr_run_{self._runs}.log"
        t0 = time.time()
        timed_out = False
        with open(log_path, "w") as logf:
            proc = subprocess.Popen(cmd, env=self.env, stdout=logf, stderr=subprocess.STDOUT,
                                    text=True, cwd=app)
            try:
                rc: int | None = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out, rc = True, None
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        output = _ANSI.sub("", log_path.read_text(errors="replace"))
        m = re.search(r"Successfully started run (\d+)", output)
        run_id = int(m.group(1)) if m else None
        status, details = "unknown", {}
        if run_id is not None:
            if timed_out:
                self.flwr("stop", str(run_id), self.connection)
            deadline = time.time() + status_timeout
            while True:
                try:
                    details = self.run_info(run_id)
                    status = details.get("status", "unknown")
                except (FederationError, subprocess.TimeoutExpired):
                    pass
                if status.startswith("finished") or time.time() > deadline:
                    break
                time.sleep(1)
        return RunResult(run_id, status, time.time() - t0, rc, output, details, timed_out)

    def check_refusal(self, mode: str = "unregistered", timeout: float = 40) -> Refusal:
        """Start one extra SuperNode that must be refused (mode: "unregistered",
        "plaintext" or "nokey", see scripts/deploy/check_refusal.sh)."""
        env = dict(self.env, CHECK_TIMEOUT=str(int(timeout)))
        cp = subprocess.run([str(DEPLOY / "check_refusal.sh"), str(self.state_dir), mode],
                            env=env, text=True, capture_output=True, timeout=timeout + 30)
        if cp.returncode == 2:
            raise FederationError(cp.stdout + cp.stderr)
        first, *rest = (cp.stdout.strip().splitlines() or ["?"])
        outcome = first.split(":")[0].split()[0]
        m = re.search(r"exit_code=(-?\d+)", first)
        return Refusal(mode=mode, outcome=outcome, exit_code=int(m.group(1)) if m else None,
                       reason_lines=rest, log_text=self.log(f"refused_{mode}"))

    def rotate_key(self, node: int) -> tuple[int, int]:
        """Rotate node ``node``'s key (1-based); returns (old_id, new_id)."""
        old = self.node_ids[node - 1]
        cp = subprocess.run([str(DEPLOY / "rotate_node_key.sh"), str(self.state_dir), str(node)],
                            env=self.env, text=True, capture_output=True, timeout=180)
        if cp.returncode != 0:
            raise FederationError(cp.stdout + cp.stderr)
        return old, self.node_ids[node - 1]

    def crash_node(self, node: int) -> list[int]:
        """SIGKILL SuperNode ``node`` (1-based) and every process under it, as a power cut would: no SIGTERM, no
        goodbye to the SuperLink. Returns the pids killed."""
        pid_file = self.state_dir / "pids" / f"supernode_{node}.pid"
        pids = [int(pid_file.read_text())]
        for pid in pids:  # breadth first: Flower starts each ClientApp in a session of its own, under the SuperNode
            kids = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
            pids += [int(k) for k in kids.split()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pid_file.unlink()
        return pids

    def stop(self) -> None:
        """Stop all processes of this federation (idempotent)."""
        if self._stopped:
            return
        subprocess.run([str(DEPLOY / "stop_local.sh"), str(self.state_dir)], env=self.env,
                       text=True, capture_output=True, timeout=120)
        self._stopped = True

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _bin(self, exe: str) -> str:
        return str(Path(self.env["FLWR_BIN"]) / exe)


def _read_env_sh(path: Path, base: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    for line in path.read_text().splitlines():
        m = re.match(r'export (\w+)="?(.*?)"?$', line.strip())
        if m:
            env[m.group(1)] = m.group(2)
    env["PATH"] = env["FLWR_BIN"] + os.pathsep + base.get("PATH", "")
    return env


def start_federation(app_dir: str | Path | None = None, state_dir: str | Path = "/tmp/seedtune-fed",
                     num_nodes: int = 2, extra_unregistered: bool = True, *,
                     node_config_extra: str | None = None, start_timeout: float = 60,
                     flwr_bin: str | Path | None = None,
                     extra_env: dict[str, str] | None = None) -> Federation:
    """Start SuperLink + ``num_nodes`` SuperNodes (TLS + node auth) in ``state_dir``.

    ``app_dir`` is only remembered as the default for :meth:`Federation.run`.
    With ``extra_unregistered`` a SuperNode with a valid but unregistered key is
    started after the federation is up; its outcome is in ``fed.unregistered``
    (``fed.unregistered.refused`` should be True). Raises FederationError with
    the script's output if anything does not come up (nothing is left running).
    """
    state = Path(state_dir).resolve()
    env = dict(os.environ, **(extra_env or {}))
    env["START_TIMEOUT"] = str(int(start_timeout))
    env["EXTRA_UNREGISTERED_KEYS"] = "1" if extra_unregistered else "0"
    if node_config_extra:
        env["NODE_CONFIG_EXTRA"] = node_config_extra
    if flwr_bin is None and (Path(sys.executable).parent / "flower-superlink").exists():
        flwr_bin = Path(sys.executable).parent
    if flwr_bin is not None:
        env["FLWR_BIN"] = str(flwr_bin)
    env.pop("FLWR_HOME", None)  # the federation gets its own, in STATE/flwr_home
    t0 = time.time()
    cp = subprocess.run([str(DEPLOY / "start_local.sh"), str(state), str(num_nodes)], env=env,
                        text=True, capture_output=True, timeout=start_timeout * (num_nodes + 3) + 60)
    if cp.returncode != 0:
        raise FederationError(f"start_local.sh failed (rc={cp.returncode}):\n{cp.stdout}{cp.stderr}")
    fed = Federation(state, num_nodes, _read_env_sh(state / "env.sh", env),
                     Path(app_dir).resolve() if app_dir else None)
    fed.start_wall_s = time.time() - t0
    if extra_unregistered:
        try:
            fed.unregistered = fed.check_refusal("unregistered")
        except BaseException:
            fed.stop()
            raise
    return fed


if __name__ == "__main__":
    # Self-check: python tests/deploy_harness.py APP_DIR [STATE_DIR]
    # APP_DIR: a Flower app whose run config has num-rounds / min-nodes /
    # wait-nodes-s (like the trivial Grid-API app in docs/deployment.md).
    app = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/trivapp")
    state_dir = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/seedtune-fed-selfcheck")
    t_all = time.time()
    with start_federation(app, state_dir, num_nodes=2) as fed:
        print(f"federation up in {fed.start_wall_s:.1f}s at {fed.address}, nodes {fed.node_ids}")
        assert fed.unregistered is not None
        print(f"unregistered node: {fed.unregistered.outcome} exit={fed.unregistered.exit_code}",
              fed.unregistered.reason_lines)
        assert fed.unregistered.refused
        res = fed.run(run_config={"num-rounds": 2}, timeout=300)
        print(f"run {res.run_id}: {res.status} in {res.wall_s:.1f}s (flwr rc={res.flwr_rc})")
        print("\n".join(l for l in res.output.splitlines() if "[trivapp]" in l))
        assert res.ok, res.output_tail()
        bad = fed.run(run_config={"min-nodes": 3, "wait-nodes-s": 5}, timeout=120)
        print(f"run {bad.run_id} (expects 3 nodes): {bad.status}, flwr rc={bad.flwr_rc}")
        assert bad.status == "finished:failed"
        for mode in ("plaintext", "nokey"):
            r = fed.check_refusal(mode)
            print(f"{mode} node: {r.outcome} exit={r.exit_code}", r.reason_lines)
            assert r.refused
        old, new = fed.rotate_key(1)
        print(f"rotated node 1: {old} -> {new}; nodes now",
              [(n["node-id"], n["status"]) for n in fed.list_nodes()])
        res2 = fed.run(run_config={"num-rounds": 2}, timeout=300)
        print(f"run {res2.run_id} after rotation: {res2.status} in {res2.wall_s:.1f}s")
        assert res2.ok, res2.output_tail()
    leftover = list((state_dir / "pids").glob("*.pid"))
    assert not leftover, leftover
    print(f"self-check OK, total {time.time() - t_all:.1f}s")
