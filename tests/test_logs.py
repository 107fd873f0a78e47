"""The logs stand-ins and deputies leave in /run/kcr-migrate: a folder keeps the newest ones,
and a log some process still writes is never removed."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from agent.logs import prune
from tests._workloads import STARTED


def test_the_oldest_logs_no_process_holds_go_first(tmp_path: Path) -> None:
    logs = []
    for i in range(6):
        path = tmp_path / f"{i}.log"
        path.write_text(f"log {i}\n")
        os.utime(path, (1000 + i, 1000 + i))       # 0.log is the oldest
        logs.append(path)
    (tmp_path / "pid7.fd1").write_text("relayed output is the job's, never pruned\n")
    with open(logs[0], "a") as held:             # a stand-in still running writes the oldest
        proc = subprocess.Popen(["sleep", "60"], stdout=held, stdin=subprocess.DEVNULL)
    STARTED.append(proc)
    removed = prune(str(tmp_path), keep=3)
    assert sorted(removed) == [str(logs[1]), str(logs[2]), str(logs[3])]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.log", "4.log", "5.log", "pid7.fd1"]
    assert prune(str(tmp_path), keep=3) == []    # at the limit: nothing more goes
