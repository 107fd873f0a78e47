"""Page batches: what compresses is compressed, what does not goes raw, and both decode to the
same pages (a sample of pages decides whether a batch is worth compressing)."""
from __future__ import annotations

import os

import pytest

from tests._transport import page_batch
from transport.pages import FLAG_ZSTD, SAMPLE_PAGES, PageBatch, decode_batch, encode_batch
from transport.schema import PAGE_SIZE


def round_trip(batch: PageBatch, level: int) -> int:
    enc = encode_batch(batch, level)
    payload = b"".join(bytes(p) for p in enc.parts)
    back = decode_batch(enc.flags, payload)
    assert back.runs == batch.runs and bytes(back.data) == bytes(batch.data)
    return enc.flags


@pytest.mark.parametrize("npages", [8, 4 * SAMPLE_PAGES, 512])
def test_random_pages_go_raw(npages: int) -> None:
    assert round_trip(page_batch(npages, fill="random"), 1) == 0


@pytest.mark.parametrize("npages", [8, 4 * SAMPLE_PAGES, 512])
def test_mixed_pages_are_compressed(npages: int) -> None:
    assert round_trip(page_batch(npages, fill="mixed"), 1) & FLAG_ZSTD


def test_a_batch_mostly_of_zero_pages_with_random_ones_between_is_compressed() -> None:
    pages = [os.urandom(PAGE_SIZE) if i % 4 == 0 else bytes(PAGE_SIZE) for i in range(512)]
    assert round_trip(PageBatch(((0x7F00_0000_0000, 512),), b"".join(pages)), 1) & FLAG_ZSTD
