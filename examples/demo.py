#!/usr/bin/env python3
"""kcr-migrate demo: start a real job, move it, and show it finishes as if nothing happened.

    sudo python3 examples/demo.py                 live-migrate it, localhost to localhost
    sudo python3 examples/demo.py --testbed       live-migrate it from hostA to hostB (test hosts:
                                                  network + mount namespaces with their own sshd)
    sudo python3 examples/demo.py --checkpoint    checkpoint it to an image, restore from it

The job is CPython running a hash chain over 32 MiB, logging progress to a file. The demo
runs it once undisturbed for reference, then again, moving it halfway; the two logs must be
identical (but for the pid each line was written by).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOB = r"""
import hashlib, os, sys, time
log = open(sys.argv[1], "a", buffering=1)
buf = bytearray(32 << 20)
h = b"kcr-migrate"
for step in range(40):
    for off in range(0, len(buf), 1 << 16):
        h = hashlib.sha256(h + bytes(buf[off:off + 32])).digest()
        buf[off:off + 32] = h
    log.write(f"step {step:2d} pid {os.getpid():7d} {h.hex()[:32]}\n")
    time.sleep(0.1)
log.write("done\n")
"""


def kcr(*args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "migrate", *args], capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"demo: kcr-migrate {args[0]} failed: {res.stderr.strip()}")
    return res.stdout.strip() + res.stderr.strip()


def start_job(workdir: Path, name: str) -> tuple[subprocess.Popen[bytes], Path]:
    script = workdir / "job.py"
    script.write_text(JOB)
    log = workdir / f"{name}.log"
    proc = subprocess.Popen([sys.executable, "-S", str(script), str(log)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return proc, log


def wait_for(path: Path, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    sys.exit(f"demo: {path} never showed {text!r}")


def strip_pids(log: str) -> str:
    return "\n".join(" ".join(w for i, w in enumerate(line.split()) if i not in (2, 3)) for line in log.splitlines())


def checkpoint_restore(workdir: Path) -> None:
    print("1. reference run, undisturbed ...")
    ref, ref_log = start_job(workdir, "reference")
    ref.wait()
    print("2. the same job again; at step 15 it is checkpointed to an image and killed ...")
    job, log = start_job(workdir, "moved")
    wait_for(log, "step 15")
    image = workdir / "job.img"
    print("   " + kcr("checkpoint", str(job.pid), "-o", str(image)))
    job.wait()
    print(f"   image: {image.stat().st_size / 2**20:.1f} MiB; `kcr-migrate show` decodes it to JSON")
    print("3. restore it: the process continues where it stopped, under its own pid ...")
    new_pid = int(kcr("restore", "-i", str(image)).split()[-1])
    print(f"   restored as pid {new_pid} (was {job.pid})")
    wait_for(log, "done")
    _reap(new_pid)
    same = strip_pids(log.read_text()) == strip_pids(ref_log.read_text())
    show_switch(log.read_text())
    print(f"4. final result identical to the undisturbed run: {'yes' if same else 'NO'}")
    if not same:
        sys.exit(1)


def show_switch(log: str) -> None:
    """The log lines around the move (where the pid changes, if it moved under a new one): the hash
    chain does not skip a beat."""
    lines = log.splitlines()
    pids = [line.split()[3] if len(line.split()) > 3 else "" for line in lines]
    at = next((i for i in range(1, len(pids)) if pids[i] and pids[i] != pids[0]), len(lines) // 2)
    for line in lines[max(0, at - 3): at + 3]:
        print(f"   {line}")


def live(workdir: Path, testbed: bool) -> None:
    hosts, extra, bed = ("localhost", "localhost"), [], None
    if testbed:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from examples.testbed import Testbed
        bed = Testbed("/run/kcr-testbed-demo", prefix="kcrd-", subnet="10.77.217.0/24")
        print("0. bringing up the test hosts hostA and hostB ...")
        bed.up()
        hosts, extra = ("hostA", "hostB"), ["--ssh-config", str(bed.ssh_config_path)]
    try:
        print("1. reference run, undisturbed ...")
        ref, ref_log = start_job(workdir, "reference")
        ref.wait()
        where = f" inside {hosts[0]}" if testbed else ""
        print(f"2. the same job again{where}; at step 15 it moves to {hosts[1]} while it runs ...")
        if bed is not None:
            script = workdir / "job.py"
            script.write_text(JOB)
            log = workdir / "moved.log"
            job = bed.popen(hosts[0], [sys.executable, "-S", str(script), str(log)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        else:
            job, log = start_job(workdir, "moved")
        wait_for(log, "step 15")
        # --new-pid: from localhost to localhost, and between the test hosts (which share this
        # machine's pid namespace), the source holds its pid until the copy runs.
        print("   " + kcr(f"{job.pid}@{hosts[0]}", hosts[1], "--new-pid", *extra).splitlines()[-1])
        job.wait()
        wait_for(log, "done")
        time.sleep(0.2)
        same = strip_pids(log.read_text()) == strip_pids(ref_log.read_text())
        show_switch(log.read_text())
        print(f"3. final result identical to the undisturbed run: {'yes' if same else 'NO'}")
        if not same:
            sys.exit(1)
    finally:
        if bed is not None:
            bed.down()


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        while os.path.exists(f"/proc/{pid}"):
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--testbed", action="store_true", help="migrate between the test hosts hostA and hostB")
    how.add_argument("--checkpoint", action="store_true", help="checkpoint to an image and restore instead")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("demo: run as root (ptrace of the job and restoring its credentials need it)")
    # Adopt the restored process (it is not our child) so its exit is reaped here.
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)
    with tempfile.TemporaryDirectory(prefix="kcr-demo-") as tmp:
        if args.checkpoint:
            checkpoint_restore(Path(tmp))
        else:
            live(Path(tmp), args.testbed)


if __name__ == "__main__":
    main()
