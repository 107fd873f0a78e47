"""fs_churn: a job that keeps changing the files of its data directory (for the fs hook tests).

    python3 -S fs_churn.py OUT_DIR DATA_DIR STEPS [SLEEP_MS]

Works inside DATA_DIR (its cwd): every step appends to ``log.txt`` (kept open, O_APPEND),
writes on at the offset of ``stream.bin`` (kept open; now and then truncated below that
offset, so the next write leaves a hole), reads on through ``input.txt`` (kept open), and
does one of: create, append, truncate, rewrite in place (same size), rename (also into and
out of ``sub/``), delete, hard-link. ``sparse.bin`` is mostly hole; one file has an xattr;
``mapped.bin`` is mapped privately and ``shared.bin`` shared, and both are written through
their mappings every step.
Every step is drawn from a fixed seed, so every run does the same. It keeps a model of what
each file must hold and checks the directory against it every 20 steps and at the end, so a
copy that differs from what the process left shows up as a FAIL after the migration.

With WORKLOAD_HOLD=PATH it waits three quarters in until PATH is there (a test that moves it).
OUT_DIR (outside the data directory): ``ready`` after 20 steps, ``output`` (one line per
step, then every file's size and sha256), ``verdict`` (PASS or FAIL: reason).
"""
from __future__ import annotations

import hashlib
import mmap
import os
import random
import sys
import time

SEED = 20081
SPARSE_SIZE = 8 << 20
MAP_SIZE = 64 << 10


class Inode:
    def __init__(self, data: bytes = b"") -> None:
        self.data = bytearray(data)


def main() -> int:
    out_dir, data_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    pause = (int(sys.argv[4]) if len(sys.argv) > 4 else 10) / 1000
    hold = os.environ.get("WORKLOAD_HOLD")      # a path: wait there three quarters in (see main's loop)
    rng = random.Random(SEED)
    os.chdir(data_dir)
    os.mkdir("sub")
    files: dict[str, Inode] = {}
    out = open(os.path.join(out_dir, "output"), "w")

    def put(name: str, data: bytes, mode: int = 0o644) -> None:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        os.write(fd, data)
        os.close(fd)
        files[name] = Inode(data)

    put("input.txt", b"".join(b"input line %05d\n" % i for i in range(4000)))
    inp = os.open("input.txt", os.O_RDONLY)
    log = os.open("log.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    files["log.txt"] = Inode()
    stream = os.open("stream.bin", os.O_WRONLY | os.O_CREAT, 0o640)
    files["stream.bin"] = Inode()
    stream_pos = 0
    fd = os.open("sparse.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    os.pwrite(fd, b"end", SPARSE_SIZE - 3)
    os.close(fd)
    files["sparse.bin"] = Inode(bytes(SPARSE_SIZE - 3) + b"end")
    put("tagged.txt", b"has an extended attribute\n")
    try:
        os.setxattr("tagged.txt", "user.kcr", b"kept")
        xattr = True
    except OSError:
        xattr = False
    read_back = bytearray()
    # Mapped files: private (written pages are the process's own) and shared (writes reach the file).
    put("mapped.bin", bytes(range(256)) * 256)
    put("shared.bin", bytes(MAP_SIZE))
    with open("mapped.bin", "r+b") as f:
        private = mmap.mmap(f.fileno(), MAP_SIZE, flags=mmap.MAP_PRIVATE)
    with open("shared.bin", "r+b") as f:
        shared = mmap.mmap(f.fileno(), MAP_SIZE, flags=mmap.MAP_SHARED)
    private_model = bytearray(private[:])

    def check() -> str | None:
        found = {os.path.join(d, f)[2:] for d, _, fs in os.walk(".") for f in fs}
        if found != set(files):
            return f"names differ: extra {sorted(found - set(files))[:3]}, missing {sorted(set(files) - found)[:3]}"
        by_inode: dict[int, int] = {}
        for name, node in files.items():
            with open(name, "rb") as f:
                if f.read() != node.data:
                    return f"{name}: content differs"
            ino = os.stat(name).st_ino
            if by_inode.setdefault(id(node), ino) != ino:
                return f"{name}: hard link broken"
        if os.stat("sparse.bin").st_blocks * 512 > 1 << 20:
            return "sparse.bin lost its hole"
        if xattr and os.getxattr("tagged.txt", "user.kcr") != b"kept":
            return "tagged.txt lost its xattr"
        if read_back != files["input.txt"].data[:len(read_back)]:
            return "input.txt read back wrong"
        if private[:] != private_model:
            return "the private mapping of mapped.bin differs"
        if shared[:] != files["shared.bin"].data:
            return "the shared mapping of shared.bin differs"
        return None

    def fail(why: str) -> int:
        with open(os.path.join(out_dir, "verdict"), "w") as v:
            v.write(f"FAIL: {why}\n")
        return 1

    serial = 0
    for step in range(steps):
        line = b"step %d\n" % step
        os.write(log, line)
        files["log.txt"].data += line
        chunk = bytes(rng.randrange(256) for _ in range(rng.randrange(100, 3000)))
        os.write(stream, chunk)
        node = files["stream.bin"].data
        if len(node) < stream_pos:
            node.extend(bytes(stream_pos - len(node)))
        node[stream_pos:stream_pos + len(chunk)] = chunk
        stream_pos += len(chunk)
        if step % 37 == 36:
            size = stream_pos // 2
            os.ftruncate(stream, size)
            del node[size:]
        read_back += os.read(inp, 16)
        at = rng.randrange(MAP_SIZE - 8)
        private[at:at + 8] = private_model[at:at + 8] = rng.randbytes(8)
        at = rng.randrange(MAP_SIZE - 8)
        shared[at:at + 8] = files["shared.bin"].data[at:at + 8] = rng.randbytes(8)

        small = sorted(n for n in files if n.startswith(("f", "r", "h", "sub/")))
        op = rng.choice(["create", "create", "append", "truncate", "rewrite", "rename", "delete", "link"])
        serial += 1
        name = ""
        if op == "create" or not small:
            op, name = "create", f"f{serial:04d}"
            put(name, rng.randbytes(rng.randrange(1, 40000)), rng.choice([0o600, 0o644, 0o755]))
        else:
            name = rng.choice(small)
            node = files[name].data
            if op == "append":
                extra = rng.randbytes(rng.randrange(1, 5000))
                with open(name, "ab") as fa:
                    fa.write(extra)
                node += extra
            elif op == "truncate":
                size = rng.randrange(0, len(node) + 2000)
                os.truncate(name, size)
                node[:] = node[:size] + bytes(max(0, size - len(node)))
            elif op == "rewrite" and node:
                at = rng.randrange(len(node))
                data = rng.randbytes(min(len(node) - at, rng.randrange(1, 500)))
                with open(name, "r+b") as f:
                    f.seek(at)
                    f.write(data)
                node[at:at + len(data)] = data
            elif op == "rename":
                new = (f"r{serial:04d}" if name.startswith("sub/") or rng.random() < 0.5 else f"sub/r{serial:04d}")
                os.rename(name, new)
                files[new] = files.pop(name)
                name = f"{name}->{new}"
            elif op == "delete":
                os.unlink(name)
                del files[name]
            elif op == "link":
                new = f"h{serial:04d}"
                os.link(name, new)
                files[new] = files[name]
                name = f"{name}={new}"
        out.write(f"{step} {op} {name}\n")
        out.flush()
        if step == 20:
            open(os.path.join(out_dir, "ready"), "w").close()
        while step == steps * 3 // 4 and hold and not os.path.exists(hold):
            time.sleep(0.01)        # held: on a busy machine a late move still finds it at work
        if step % 20 == 19 and (why := check()) is not None:
            return fail(f"step {step}: {why}")
        time.sleep(pause)

    if (why := check()) is not None:
        return fail(f"at the end: {why}")
    os.close(log)
    os.close(stream)
    os.close(inp)
    private.close()
    shared.close()
    for name in sorted(files):
        with open(name, "rb") as fh:
            data = fh.read()
        out.write(f"{name} {len(data)} {hashlib.sha256(data).hexdigest()} {os.stat(name).st_mode & 0o7777:o}\n")
    out.close()
    with open(os.path.join(out_dir, "verdict"), "w") as v:
        v.write("PASS\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
