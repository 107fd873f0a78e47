"""A TCP connection between two processes of one job, over loopback, with megabytes in
flight: python3 tcp_pair.py OUTDIR

The parent listens on 127.0.0.1, forks a child that connects, and writes 3000 numbered 4 KiB
chunks to it; the child reads nothing until WORKLOAD_HOLD's file exists (if set), so both
sockets' queues are full while the job is moved. Then the child reads everything, hashing it,
and answers with the count and the hash; the parent checks them against what it wrote and
writes OUTDIR/output and OUTDIR/verdict. OUTDIR/ready appears once 100 chunks are written."""
import hashlib
import os
import socket
import sys
import time

CHUNKS = 3000


def held(path):
    while path and not os.path.exists(path) and os.path.exists(os.path.dirname(path)):
        time.sleep(0.01)


def main():
    out = sys.argv[1]
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    with open(os.path.join(out, "port"), "w") as f:
        f.write(str(server.getsockname()[1]))
    child = os.fork()
    if child == 0:
        conn = socket.create_connection(server.getsockname())
        server.close()
        held(os.environ.get("WORKLOAD_HOLD", ""))
        h, total = hashlib.sha256(), 0
        while data := conn.recv(65536):
            h.update(data)
            total += len(data)
        conn.sendall(f"{total} {h.hexdigest()}".encode())
        conn.close()
        os._exit(0)
    conn, _ = server.accept()
    h = hashlib.sha256()
    for i in range(CHUNKS):
        chunk = b"%08d" % i * 512
        conn.sendall(chunk)
        h.update(chunk)
        if i == 100:
            open(os.path.join(out, "ready"), "w").close()
    conn.shutdown(socket.SHUT_WR)
    reply = b""
    while data := conn.recv(4096):
        reply += data
    _, status = os.waitpid(child, 0)
    want = f"{CHUNKS * 4096} {h.hexdigest()}"
    with open(os.path.join(out, "output"), "w") as f:
        f.write(f"the child read {reply.decode()}\n")
    ok = reply.decode() == want and status == 0
    with open(os.path.join(out, "verdict"), "w") as f:
        f.write("PASS\n" if ok else f"FAIL: {reply.decode()!r}, wanted {want!r}, child status {status}\n")


main()
