"""A PostgreSQL server for the tests that move one (tests/test_programs.py, test_live_trees.py)."""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest

from tests._workloads import STARTED

class PostgresServer:
    """A PostgreSQL server (postmaster and its checkpointer, background writer, WAL writer and
    replication launcher: five processes; autovacuum off, whose workers would come and go) run
    as the postgres user in a
    directory of its own, on a unix socket (and with ``tcp_port``, on TCP at every address as
    well), started by ``spawn`` (Popen, or a test host's popen); ``sql`` runs psql against it
    on the unix socket."""

    def __init__(self, spawn: Callable[..., "subprocess.Popen[bytes]"] = subprocess.Popen, tcp_port: int = 0) -> None:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("no postgres user on this machine (apt-get install postgresql)")
        if shutil.which("initdb") is None or shutil.which("postgres") is None or shutil.which("psql") is None:
            pytest.skip("no PostgreSQL server on this machine (apt-get install postgresql)")
        self.dir = Path(tempfile.mkdtemp(prefix="kcr-pg-", dir="/tmp"))
        self.dir.chmod(0o755)
        shutil.chown(self.dir, "postgres")
        self.log = self.dir / "server.log"
        as_postgres = ["setpriv", "--reuid", "postgres", "--regid", "postgres", "--init-groups"]
        res = subprocess.run([*as_postgres, "initdb", "-D", str(self.dir / "data"), "-A", "trust"],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        if tcp_port:            # clients of the test hosts' own addresses, as of localhost
            with open(self.dir / "data" / "pg_hba.conf", "a") as hba:
                hba.write("host all all 0.0.0.0/0 trust\n")
        self.log.touch()
        shutil.chown(self.log, "postgres")
        self.shm_before = _segments()
        self.sysv_before = _sysv_segments()
        with open(self.log, "ab") as log:
            listen = ["-c", "listen_addresses=*", "-c", f"port={tcp_port}"] if tcp_port else ["-c", "listen_addresses="]
            self.port = tcp_port or 5432
            self.proc = spawn([*as_postgres, "postgres", "-D", str(self.dir / "data"), *listen,
                               "-c", f"unix_socket_directories={self.dir}", "-c", "autovacuum=off"],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
                                         start_new_session=True)
        STARTED.append(self.proc)
        deadline = time.monotonic() + 60
        while not (self.dir / f".s.PGSQL.{self.port}").exists() or self.sql("select 1").returncode:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    def sql(self, query: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["psql", "-h", str(self.dir), "-p", str(self.port), "-U", "postgres", "-tAc", query],
                              capture_output=True, text=True, timeout=60)

    def close(self, pid: int) -> None:
        """Kill the server (its process group: ``pid``'s) and reap what was ours to reap."""
        from tests.test_trees import reap_orphans, tree
        members = list(tree(pid)) if Path(f"/proc/{pid}").exists() else []
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        reap_orphans(members)
        shutil.rmtree(self.dir, ignore_errors=True)
        for name in _segments() - self.shm_before:     # killed, it left its dynamic shared memory
            try:
                os.unlink(f"/dev/shm/{name}")
            except FileNotFoundError:
                pass
        for shmid in _sysv_segments() - self.sysv_before:    # and its main SysV segment, detached
            subprocess.run(["ipcrm", "-m", str(shmid)], capture_output=True, check=False)


def _sysv_segments() -> set[int]:
    """The ids of the SysV shared memory segments no process has attached."""
    with open("/proc/sysvipc/shm") as f:
        rows = [line.split() for line in f.read().splitlines()[1:]]
    return {int(r[1]) for r in rows if len(r) > 6 and r[6] == "0"}


def _segments() -> set[str]:
    """PostgreSQL's dynamic shared memory segments in /dev/shm."""
    return {name for name in os.listdir("/dev/shm") if name.startswith("PostgreSQL.")}
