"""Pid 1 of the soft-dirty VM (stage 2, after switch_root into the host's root under an overlay).

It mounts what a Linux system has, brings up loopback, records the kernel's tracker probes,
runs pytest once per run of the plan (``_softdirty_vm.py`` wrote it into the results share)
under that run's transparent-huge-page mode, reaps every orphan meanwhile (it is pid 1), writes
``status.json`` beside each run's junit xml, and powers the machine off. Its output, and
pytest's, goes to the console, which the host keeps as a log. Standard library only, until
the probes, which import the project from the plan's repo.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import traceback

libc = ctypes.CDLL(None, use_errno=True)
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC
THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def say(text: str) -> None:
    print(f"kcr-vm: {text}", flush=True)


def mount(source: str, target: str, fstype: str, options: str = "") -> None:
    os.makedirs(target, exist_ok=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), 0, options.encode() or None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t {fstype} {source} {target}: {os.strerror(err)}")


def power_off() -> None:
    os.sync()
    libc.reboot(LINUX_REBOOT_CMD_POWER_OFF)
    os._exit(1)      # not reached; pid 1 exiting panics the kernel, and qemu (-no-reboot) exits


class Deadline(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise Deadline()


def run_reaping(argv: list[str], env: dict[str, str], cwd: str, timeout_s: float) -> int | None:
    """Run ``argv`` and wait for it, reaping every other process that ends meanwhile (orphans
    come to pid 1). Its exit status, or None when it ran past ``timeout_s`` (then it is killed)."""
    proc = subprocess.Popen(argv, env=env, cwd=cwd, start_new_session=True)
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(max(1, int(timeout_s)))
    try:
        while True:
            pid, status = os.waitpid(-1, 0)
            if pid == proc.pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return proc.returncode
    except Deadline:
        say(f"{argv[2:]} still running after {timeout_s:.0f} s: killing it")
        os.killpg(proc.pid, signal.SIGKILL)
        return None
    finally:
        signal.alarm(0)


def probes(repo: str) -> dict[str, dict[str, object]]:
    sys.path.insert(0, repo)
    from precopy.probe import probe_backends
    return {name: {"available": p.available, "reason": p.reason} for name, p in probe_backends().items()}


def main(plan_path: str) -> None:
    mount("proc", "/proc", "proc")
    uptime = float(open("/proc/uptime").read().split()[0])
    mount("sysfs", "/sys", "sysfs")
    mount("devtmpfs", "/dev", "devtmpfs")
    mount("devpts", "/dev/pts", "devpts", "newinstance,ptmxmode=0666")
    with open(plan_path) as f:
        plan = json.load(f)
    results, repo = plan["results"], plan["repo"]
    for path in ("/dev/shm", "/tmp", "/run"):
        if not (repo + "/").startswith(path + "/"):     # (a checkout there stays seen, writable in the overlay)
            mount("tmpfs", path, "tmpfs", "mode=1777")
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
           "LANG": "C.UTF-8", "TERM": "dumb", "PYTHONPATH": repo, **plan["env"]}
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    kernel = os.uname().release
    found = probes(repo)
    say(f"kernel {kernel}, up {uptime:.1f} s; trackers: "
        + ", ".join(f"{n} {'yes' if p['available'] else 'no'}" for n, p in found.items()))
    runs = []
    for i, run in enumerate(plan["runs"]):
        with open(THP, "w") as f:
            f.write(run["thp"])
        with open(THP) as f:
            thp_line = f.read().strip()
        junit = f"run{i}-thp-{run['thp']}.xml"
        argv = [sys.executable, "-m", "pytest", "-W", "error", "-p", "no:cacheprovider", "-q", "-rfEs",
                f"--junitxml={results}/{junit}", *run["tests"]]
        say(f"run {i}: THP {thp_line}: {' '.join(argv[1:])}")
        start = time.monotonic()
        status = run_reaping(argv, env, repo, run["timeout_s"])
        seconds = time.monotonic() - start
        say(f"run {i}: pytest status {status} in {seconds:.1f} s")
        runs.append({"thp": run["thp"], "thp_line": thp_line, "status": status, "seconds": seconds, "junit": junit})
    with open(f"{results}/.status.json", "w") as f:
        json.dump({"kernel": kernel, "uptime_at_start_s": uptime, "probes": found, "runs": runs}, f)
    os.replace(f"{results}/.status.json", f"{results}/status.json")


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
    finally:
        power_off()
