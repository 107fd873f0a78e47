/* Ground truth for the dirty trackers: writes a pseudo-random, logged set of pages at a set rate.
 * Usage: dirty_writer OUTDIR NPAGES RATE SEED [THP_MIB]
 *   NPAGES  pages of a private anonymous region (no huge pages), all populated first
 *   RATE    page writes per second (0: none)
 *   THP_MIB a second region of that many MiB backed by transparent huge pages (MADV_HUGEPAGE)
 * Every write stores a new 64-bit sequence number at a pseudo-random offset of the page, so
 * the page's bytes always change. After each burst of stores (one per millisecond) the page
 * numbers are appended to OUTDIR/log as little-endian u32 (region pages 0..NPAGES-1, then the
 * THP region's): a record is in the log only once its store is done. OUTDIR/layout says where
 * the regions are. Runs until killed. SIGUSR1 stops it (SIGSTOP to itself) once its current
 * burst is logged: stopped so, every store it made is in the log (a SIGSTOP from outside can
 * land between a burst's stores and their log record). */
#include "ckpt_common.h"
#include <signal.h>
#include <stdint.h>
#include <sys/mman.h>

#define PAGE 4096UL
#define HUGE (2UL << 20)

static uint64_t rng_state;
static uint64_t rng(void) {           /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ULL;
}

static volatile sig_atomic_t stop_asked;
static void on_usr1(int sig) { (void)sig; stop_asked = 1; }

int main(int argc, char **argv) {
    init(argc, argv);
    struct sigaction sa = {0};
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    if (argc < 5) { fprintf(stderr, "usage: %s OUTDIR NPAGES RATE SEED [THP_MIB]\n", argv[0]); return 2; }
    unsigned long npages = strtoul(argv[2], NULL, 0);
    double rate = atof(argv[3]);
    rng_state = strtoull(argv[4], NULL, 0) | 1;
    unsigned long thp_pages = argc > 5 ? strtoul(argv[5], NULL, 0) * (1UL << 20) / PAGE : 0;

    char *region = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED) { perror("mmap"); return 3; }
    madvise(region, npages * PAGE, MADV_NOHUGEPAGE);
    for (unsigned long i = 0; i < npages; i++) memset(region + i * PAGE, (int)(i & 0xff) | 1, PAGE);

    char *thp = NULL;
    if (thp_pages) {
        char *raw = mmap(NULL, thp_pages * PAGE + HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (raw == MAP_FAILED) { perror("mmap thp"); return 3; }
        thp = (char *)(((uintptr_t)raw + HUGE - 1) & ~(HUGE - 1));
        madvise(thp, thp_pages * PAGE, MADV_HUGEPAGE);
        for (unsigned long i = 0; i < thp_pages; i++) memset(thp + i * PAGE, 7, PAGE);
    }

    char text[256];
    snprintf(text, sizeof text, "region %#lx %lu\nthp %#lx %lu\n", (unsigned long)region, npages,
             (unsigned long)thp, thp_pages);
    write_file("layout", text);
    char path[4096];
    snprintf(path, sizeof path, "%s/log", outdir);
    int log = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
    if (log < 0) { perror(path); return 3; }
    sleep_ms(1);      /* bind nanosleep and clock_gettime now: a lazy PLT binding later would write a page */
    struct timespec last;
    clock_gettime(CLOCK_MONOTONIC, &last);
    ready();

    unsigned long total = npages + thp_pages;
    uint64_t seq = 0;
    double owed = 0;
    uint32_t burst[4096];
    /* The rate is kept by the clock: a wake-up a busy machine delays writes what it owes (up to
     * 20 ms of it, so a process stopped for a while does not come back with a flood). At
     * RATE 0 it does not look at the clock either: the times it would keep change a page. */
    for (;;) {
        sleep_ms(1);
        if (rate <= 0)
            continue;
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        double elapsed = (now.tv_sec - last.tv_sec) + (now.tv_nsec - last.tv_nsec) / 1e9;
        last = now;
        owed += rate * (elapsed < 0.020 ? elapsed : 0.020);
        int n = 0;
        while (owed >= 1.0 && n < 4096) {
            unsigned long idx = rng() % total;
            char *page = idx < npages ? region + idx * PAGE : thp + (idx - npages) * PAGE;
            uint64_t slot = rng() % (PAGE / 8);
            ((volatile uint64_t *)page)[slot] = ++seq;
            burst[n++] = (uint32_t)idx;
            owed -= 1.0;
        }
        if (n && write(log, burst, n * sizeof burst[0]) != (ssize_t)(n * sizeof burst[0])) { perror("log"); return 3; }
        if (stop_asked) {
            stop_asked = 0;
            raise(SIGSTOP);
        }
    }
}
