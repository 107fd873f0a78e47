"""Realistic synthetic page batches, for testing and benchmarking the transport.

Process memory is a mix of zero pages, text-like pages (strings, source, logs: compressible)
and random-looking pages (compressed or encrypted data, hashes: incompressible), in runs of a
few pages of one kind. ``SyntheticPages`` builds a pool of such batches once (building is
slow, and first touch of fresh memory is slow on some VMs) and then hands out batches that
cycle through the pool at ever new addresses, so generating never limits a measurement.
"""
from __future__ import annotations

import random
from typing import Iterator

from transport.frozen import frozen
from transport.pages import DEFAULT_BATCH_BYTES, PageBatch
from transport.schema import PAGE_SIZE

BASE_ADDR = 0x7F00_0000_0000
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which "
         "but have an they you were her she there been one all we their has would when if so no will "
         "error warning request response value count index buffer thread process memory page signal "
         "return static const struct unsigned char int long void null true false self def import "
         "http https json config user session token cache queue worker server client stream").split()


@frozen
class Mix:
    zero: float = 0.3
    text: float = 0.4
    random: float = 0.3


def _text_corpus(rng: random.Random, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        words = rng.choices(WORDS, k=4096)
        out += (" ".join(words) + "\n").encode()
        out += f"{rng.randrange(1 << 32):08x} {rng.random():.6f}\n".encode()
    return bytes(out[:size])


def _batch_data(rng: random.Random, npages: int, mix: Mix, corpus: bytes) -> bytes:
    data = bytearray(npages * PAGE_SIZE)
    kinds = ("zero", "text", "random")
    weights = (mix.zero, mix.text, mix.random)
    page = 0
    while page < npages:
        run = min(rng.randint(1, 16), npages - page)
        kind = rng.choices(kinds, weights)[0]
        start, end = page * PAGE_SIZE, (page + run) * PAGE_SIZE
        if kind == "text":
            for off in range(start, end, PAGE_SIZE):
                src = rng.randrange(0, len(corpus) - PAGE_SIZE)
                data[off: off + PAGE_SIZE] = corpus[src: src + PAGE_SIZE]
        elif kind == "random":
            data[start:end] = rng.randbytes(end - start)
        page += run
    return bytes(data)


class SyntheticPages:
    """A pool of ``pool_batches`` batches of ``batch_bytes``, built once from ``seed``."""

    def __init__(self, *, batch_bytes: int = DEFAULT_BATCH_BYTES, pool_batches: int = 16,
                 mix: Mix = Mix(), seed: int = 0) -> None:
        if batch_bytes % PAGE_SIZE or batch_bytes <= 0:
            raise ValueError("batch_bytes must be a positive multiple of the page size")
        rng = random.Random(seed)
        corpus = _text_corpus(rng, 1 << 20)
        self.batch_bytes = batch_bytes
        self.pool = [_batch_data(rng, batch_bytes // PAGE_SIZE, mix, corpus) for _ in range(pool_batches)]

    def batches(self, total_bytes: int, *, start_addr: int = BASE_ADDR) -> Iterator[PageBatch]:
        """Batches adding up to ``total_bytes`` (rounded up to whole pages), one run each."""
        addr = start_addr
        left = -(-total_bytes // PAGE_SIZE) * PAGE_SIZE
        i = 0
        while left > 0:
            data = self.pool[i % len(self.pool)]
            if left < len(data):
                data = data[:left]
            yield PageBatch(((addr, len(data) // PAGE_SIZE),), data)
            addr += len(data)
            left -= len(data)
            i += 1
