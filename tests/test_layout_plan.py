"""plan_layout: what a destination unmaps, maps anew and keeps between two pre-copy layouts."""
from __future__ import annotations

from agent.layout_plan import LayoutPlan, Readvise, Reprotect, applied, in_ranges, plan_layout
from transport.schema import ADV_DONTDUMP, PAGE_SIZE, AddressRange, MappingsDelta, Vma

P = PAGE_SIZE
RW, RO, NONE = 3, 1, 0


def anon(start: int, pages: int, prot: int = RW, **kw: object) -> Vma:
    return Vma(start * P, (start + pages) * P, prot, False, "anon", **kw)  # type: ignore[arg-type]


def data_file(start: int, pages: int, pgoff_pages: int = 0, path: str = "/srv/data") -> Vma:
    return Vma(start * P, (start + pages) * P, RW, False, "file", path=path, pgoff=pgoff_pages * P)


def spans(*pairs: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    return tuple((a * P, b * P) for a, b in pairs)


def test_the_first_layout_maps_everything() -> None:
    new = [anon(10, 4), data_file(20, 2)]
    assert plan_layout([], new) == LayoutPlan((), tuple(new), (), (), ())


def test_a_grown_heap_keeps_its_old_part_and_maps_only_the_new_one() -> None:
    heap = Vma(10 * P, 14 * P, RW, False, "heap")
    plan = plan_layout([heap], [Vma(10 * P, 20 * P, RW, False, "heap")])
    assert plan.kept == spans((10, 14))
    assert plan.map == (Vma(14 * P, 20 * P, RW, False, "heap"),)
    assert plan.unmap == () and plan.reprotect == ()


def test_a_split_by_mprotect_is_reprotected_in_place() -> None:
    plan = plan_layout([anon(10, 8)], [anon(10, 3), anon(13, 2, RO), anon(15, 3)])
    assert plan.map == () and plan.unmap == ()
    assert plan.kept == spans((10, 18))
    assert plan.reprotect == (Reprotect(13 * P, 15 * P, RO),)


def test_an_arena_grown_by_mprotect_keeps_both_sides() -> None:
    # glibc grows a thread's heap by making part of its PROT_NONE reservation writable.
    plan = plan_layout([anon(10, 4), anon(14, 60, NONE)], [anon(10, 8), anon(18, 56, NONE)])
    assert plan.map == () and plan.unmap == ()
    assert plan.reprotect == (Reprotect(14 * P, 18 * P, RW),)


def test_another_backing_starts_out_empty() -> None:
    plan = plan_layout([anon(10, 4)], [data_file(10, 4)])
    assert plan.map == (data_file(10, 4),) and plan.kept == ()


def test_a_file_at_another_offset_is_another_backing() -> None:
    assert plan_layout([data_file(10, 4, 0)], [data_file(10, 4, 1)]).map == (data_file(10, 4, 1),)
    assert plan_layout([data_file(10, 4)], [data_file(10, 4, path="/srv/other")]).kept == ()


def test_a_file_mapping_that_grew_maps_the_new_part_at_its_offset() -> None:
    plan = plan_layout([data_file(10, 2, 5)], [data_file(10, 4, 5)])
    assert plan.kept == spans((10, 12))
    assert plan.map == (data_file(12, 2, 7),)


def test_what_is_gone_is_unmapped() -> None:
    plan = plan_layout([anon(10, 4), anon(20, 4), anon(30, 8)], [anon(10, 4), anon(30, 2)])
    assert plan.unmap == spans((20, 24), (32, 38))
    assert plan.kept == spans((10, 14), (30, 32))


def test_advice_follows_the_layout() -> None:
    plan = plan_layout([anon(10, 4)], [anon(10, 4, advice=ADV_DONTDUMP)])
    assert plan.readvise == (Readvise(10 * P, 14 * P, ADV_DONTDUMP, 0),)


def test_a_stack_is_never_merged_with_plain_memory() -> None:
    stack = Vma(10 * P, 14 * P, RW, False, "stack", growsdown=True)
    assert plan_layout([anon(10, 4)], [stack]).map == (stack,)


def shm(start: int, pages: int, pgoff_pages: int = 0, ino: int = 7, prot: int = RW) -> Vma:
    return Vma(start * P, (start + pages) * P, prot, True, "anon", pgoff=pgoff_pages * P, ino=ino)


def test_shared_memory_split_by_mprotect_keeps_both_pieces() -> None:
    plan = plan_layout([shm(10, 8)], [shm(10, 4), shm(14, 4, pgoff_pages=4, prot=RO)])
    assert plan.map == () and plan.kept == spans((10, 18))
    assert plan.reprotect == (Reprotect(14 * P, 18 * P, RO),)


def test_new_shared_memory_or_a_replaced_file_at_the_same_place_starts_out_empty() -> None:
    assert plan_layout([shm(10, 4, ino=7)], [shm(10, 4, ino=8)]).map == (shm(10, 4, ino=8),)
    old = Vma(10 * P, 14 * P, RW, False, "file", path="/srv/data", ino=100)
    new = Vma(10 * P, 14 * P, RW, False, "file", path="/srv/data", ino=101)   # rewritten by rename
    assert plan_layout([old], [new]).map == (new,)


def test_a_layout_change_applies_to_its_ranges_only() -> None:
    """``applied`` (what the destination does with a MappingsDelta) agrees with replacing the
    ranges in the whole list, mappings cut at a range's edge included."""
    before = [anon(0, 4), anon(4, 2, RO), data_file(8, 4, 2), anon(20, 10), anon(40, 2)]
    delta = MappingsDelta((AddressRange(2 * P, 6 * P), AddressRange(24 * P, 26 * P), AddressRange(50 * P, 52 * P)),
                          (anon(2, 4, RO), anon(24, 2, RO), anon(50, 2)))
    assert applied(before, delta) == [anon(0, 2), anon(2, 4, RO), data_file(8, 4, 2), anon(20, 4), anon(24, 2, RO),
                                      anon(26, 4), anon(40, 2), anon(50, 2)]
    assert in_ranges(before, [(2 * P, 6 * P), (9 * P, 10 * P)]) == [anon(2, 2), anon(4, 2, RO), data_file(9, 1, 3)]
