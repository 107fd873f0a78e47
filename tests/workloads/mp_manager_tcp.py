"""A multiprocessing manager served over TCP on loopback: python3 mp_manager_tcp.py OUTDIR

The manager's server process holds a queue and a dict; a worker process takes numbers from
the queue and files their squares in the dict; the main process feeds it and, once
WORKLOAD_HOLD's file exists (if set), ends it and writes the dict's sum to OUTDIR/output and
PASS or FAIL to OUTDIR/verdict. Every call goes over a TCP connection between two processes
of the job (authenticated, pickled). OUTDIR/ready appears once 50 numbers are filed."""
import multiprocessing as mp
import os
import sys
import time
from multiprocessing.managers import SyncManager

N = 400


def worker(q, d):
    while (n := q.get()) is not None:
        d[n] = n * n


def held(path):
    while path and not os.path.exists(path) and os.path.exists(os.path.dirname(path)):
        time.sleep(0.01)


def main():
    out = sys.argv[1]
    ctx = mp.get_context("fork")
    m = SyncManager(address=("127.0.0.1", 0), authkey=b"kcr-test", ctx=ctx)
    m.start()
    q, d = m.Queue(), m.dict()
    w = ctx.Process(target=worker, args=(q, d))     # its proxies connect to the manager anew
    w.start()
    for n in range(N):
        q.put(n)
        if n == 60:
            while len(d) < 50:
                time.sleep(0.01)
            open(os.path.join(out, "ready"), "w").close()
            held(os.environ.get("WORKLOAD_HOLD", ""))
    q.put(None)
    w.join()
    total = sum(d.values())
    with open(os.path.join(out, "output"), "w") as f:
        f.write(f"{len(d)} squares, sum {total}\n")
    ok = len(d) == N and total == sum(n * n for n in range(N)) and w.exitcode == 0
    m.shutdown()
    with open(os.path.join(out, "verdict"), "w") as f:
        f.write("PASS\n" if ok else f"FAIL: {len(d)} squares, worker {w.exitcode}\n")


if __name__ == "__main__":
    main()
