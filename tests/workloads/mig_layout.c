/* A job whose address space changes shape while it runs, as real programs' do: the brk heap
 * grows (sbrk), an arena reserved PROT_NONE is made writable piece by piece (mprotect, as glibc
 * grows a thread's heap), a mapping grows in place (mremap), and a page in the middle of a
 * mapping flips read-only and back (mprotect splits it in three and merges it again). All
 * that memory keeps content written before; the job checks every word of it at each step and
 * at the end. Usage: mig_layout OUTDIR STEPS (one step per 20 ms; ready after step 5). */
#include "ckpt_common.h"
#include <stdint.h>
#include <sys/mman.h>

#define PAGE 4096UL
#define ARENA_PAGES 4096UL            /* 16 MiB reserved */
#define GROW_PAGES 16UL               /* per step */

static uint64_t word(uintptr_t addr, uint64_t salt) { return (addr * 0x9E3779B97F4A7C15ull) ^ salt; }

static void fill(char *p, unsigned long pages, uint64_t salt) {
    for (unsigned long i = 0; i < pages * PAGE / 8; i++) ((uint64_t *)p)[i] = word((uintptr_t)(p + i * 8), salt);
}

static long check(const char *p, unsigned long pages, uint64_t salt) {   /* index of the first bad word, or -1 */
    for (unsigned long i = 0; i < pages * PAGE / 8; i++)
        if (((const uint64_t *)p)[i] != word((uintptr_t)(p + i * 8), salt)) return (long)i;
    return -1;
}

int main(int argc, char **argv) {
    init(argc, argv);
    if (argc < 3) { fprintf(stderr, "usage: %s OUTDIR STEPS\n", argv[0]); return 2; }
    long steps = atol(argv[2]) * scale;
    /* Everything that mallocs (stdio's buffers, readiness) happens before the heap is ours,
     * so that malloc never extends brk in the middle of it. */
    FILE *out = open_output();
    fprintf(out, "start\n");
    char ready_path[4096];
    snprintf(ready_path, sizeof ready_path, "%s/ready", outdir);
    char *brk0 = sbrk(0);
    unsigned long brk_pages = 0;
    char *arena = mmap(NULL, ARENA_PAGES * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    /* Room to grow in place: reserve, then give back all but the first pages. */
    char *grow = mmap(NULL, ARENA_PAGES * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    char *flip = mmap(NULL, 64 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (arena == MAP_FAILED || grow == MAP_FAILED || flip == MAP_FAILED) { perror("mmap"); return 3; }
    munmap(grow, ARENA_PAGES * PAGE);
    grow = mmap(grow, GROW_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (grow == MAP_FAILED) { perror("mmap grow"); return 3; }
    fill(grow, GROW_PAGES, 3);
    fill(flip, 64, 4);
    unsigned long arena_pages = 0, grow_pages = GROW_PAGES;
    for (long s = 0; s < steps && (arena_pages + GROW_PAGES) <= ARENA_PAGES; s++) {
        if (sbrk(GROW_PAGES * PAGE) == (void *)-1) { verdict(0, "sbrk: %s", strerror(errno)); return 1; }
        fill(brk0 + brk_pages * PAGE, GROW_PAGES, 1);
        brk_pages += GROW_PAGES;
        if (mprotect(arena + arena_pages * PAGE, GROW_PAGES * PAGE, PROT_READ | PROT_WRITE)) { verdict(0, "mprotect"); return 1; }
        fill(arena + arena_pages * PAGE, GROW_PAGES, 2);
        arena_pages += GROW_PAGES;
        if (grow_pages + GROW_PAGES <= ARENA_PAGES) {
            if (mremap(grow, grow_pages * PAGE, (grow_pages + GROW_PAGES) * PAGE, 0) == grow) {
                fill(grow + grow_pages * PAGE, GROW_PAGES, 3);
                grow_pages += GROW_PAGES;
            } else {
                fprintf(stderr, "step %ld: mremap in place from %lu pages: %s\n", s, grow_pages, strerror(errno));
            }
        }
        int ro = s % 2 == 0;
        mprotect(flip + 20 * PAGE, 4 * PAGE, ro ? PROT_READ : PROT_READ | PROT_WRITE);
        long bad;
        if ((bad = check(brk0, brk_pages, 1)) >= 0) { verdict(0, "heap word %ld changed at step %ld", bad, s); return 1; }
        if ((bad = check(arena, arena_pages, 2)) >= 0) { verdict(0, "arena word %ld changed at step %ld", bad, s); return 1; }
        if ((bad = check(grow, grow_pages, 3)) >= 0) { verdict(0, "grown mapping word %ld changed at step %ld", bad, s); return 1; }
        if ((bad = check(flip, 64, 4)) >= 0) { verdict(0, "split mapping word %ld changed at step %ld", bad, s); return 1; }
        fprintf(out, "step %ld heap %lu arena %lu grown %lu\n", s, brk_pages, arena_pages, grow_pages);
        if (s == 5) close(open(ready_path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644));
        sleep_ms(20);
    }
    hold_on();                      /* WORKLOAD_HOLD: until the test lets it go, then check once more */
    long bad;
    if ((bad = check(brk0, brk_pages, 1)) >= 0) { verdict(0, "heap word %ld changed at the end", bad); return 1; }
    if ((bad = check(arena, arena_pages, 2)) >= 0) { verdict(0, "arena word %ld changed at the end", bad); return 1; }
    if ((bad = check(grow, grow_pages, 3)) >= 0) { verdict(0, "grown mapping word %ld changed at the end", bad); return 1; }
    if ((bad = check(flip, 64, 4)) >= 0) { verdict(0, "split mapping word %ld changed at the end", bad); return 1; }
    verdict(1, "");
    return 0;
}
