"""CPython's asyncio, a program with no server: python3 asyncio_job.py OUT READY GO [N]

A producer puts N numbers (300) on an asyncio.Queue, one every 10 ms (timers); a consumer
chains a hash over them and writes each to OUT as it goes. The event loop holds an epoll
instance and a socketpair as its self-pipe. READY appears after the 21st number; then the
producer waits (on a timer) until GO exists before it ends the queue."""
import asyncio
import hashlib
import os
import sys


async def producer(q, n, go):
    for i in range(n):
        await q.put(i)
        await asyncio.sleep(0.01)
    while not os.path.exists(go):
        await asyncio.sleep(0.01)
    await q.put(None)


async def consumer(q, out, ready):
    h = b""
    while (i := await q.get()) is not None:
        h = hashlib.sha256(h + bytes([i % 256])).digest()
        out.write(f"{i} {h.hex()[:16]}\n")
        out.flush()
        if i == 20:
            open(ready, "w").close()


async def main():
    q = asyncio.Queue()
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 300
    with open(sys.argv[1], "w") as out:
        await asyncio.gather(producer(q, n, sys.argv[3]), consumer(q, out, sys.argv[2]))


asyncio.run(main())
