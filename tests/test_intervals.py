"""Run arithmetic (precopy.intervals) against a set-of-pages model."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from precopy.intervals import (
    SpanIndex,
    add_runs,
    clip,
    intersect,
    intersect_spans,
    merge_spans,
    normalize,
    npages,
    pages_of,
    runs_of,
    splice_spans,
    subtract,
    subtract_spans,
    union,
    within,
)
from transport.schema import PAGE_SIZE

P = PAGE_SIZE
runs_st = st.lists(st.tuples(st.integers(0, 64).map(lambda i: 0x10000 + i * P), st.integers(1, 8)), max_size=12)


@given(runs_st, runs_st)
def test_operations_match_sets_of_pages(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> None:
    sa, sb = pages_of(a), pages_of(b)
    na, nb = normalize(a), normalize(b)
    assert pages_of(na) == sa and npages(na) == len(sa)
    assert pages_of(union(a, b)) == sa | sb
    assert pages_of(intersect(na, nb)) == sa & sb
    assert pages_of(subtract(na, nb)) == sa - sb
    spans = [(s, s + n * P) for s, n in nb]
    assert pages_of(clip(na, spans)) == sa & sb
    assert runs_of(sa) == na


def test_adjacent_runs_merge() -> None:
    assert normalize([(0x3000, 1), (0x1000, 2)]) == [(0x1000, 3)]
    assert subtract([(0x1000, 4)], [(0x2000, 1)]) == [(0x1000, 1), (0x3000, 2)]


def test_within_finds_the_span_holding_an_address() -> None:
    kept = [(10 * PAGE_SIZE, 14 * PAGE_SIZE), (30 * PAGE_SIZE, 32 * PAGE_SIZE)]
    assert within(kept, 10 * PAGE_SIZE) and within(kept, 31 * PAGE_SIZE + 5)
    assert not within(kept, 14 * PAGE_SIZE) and not within(kept, 0) and not within(kept, 40 * PAGE_SIZE)


@given(runs_st, runs_st)
def test_the_incremental_forms_match_the_whole_list_ones(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> None:
    na, nb = normalize(a), normalize(b)
    assert add_runs(na, nb) == union(na, nb)
    spans_a = [(s, s + n * P) for s, n in na]
    region = [(s, s + n * P) for s, n in nb]
    inside = intersect_spans(spans_a[::2], region)      # some spans within the region
    assert splice_spans(spans_a, region, inside) == merge_spans(subtract_spans(spans_a, region) + inside)
    index = SpanIndex(spans_a)
    for s, e in region:
        assert index.clip(s, e) == intersect_spans(spans_a, [(s, e)])
