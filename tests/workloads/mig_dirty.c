/* A job that keeps dirtying its memory at a set rate, for live migration tests (P.Haul's
 * mem-touch, made deterministic): MEM MiB, RATE MiB/s of page writes in 10 ms steps, ITERS
 * steps, then a checksum of everything as its output. With TICKER=1 a thread reads the clock
 * and getpid() in a loop and writes to OUTDIR/gap the longest time it saw between a tick with
 * the old pid and the first with the new one: the downtime as the program itself lives it.
 * With THP=1 the memory is 2 MiB aligned and asks for transparent huge pages (MADV_HUGEPAGE).
 * With WORKLOAD_HOLD (a path) it waits after its steps, before the checksum, until that file
 * exists: a job to be moved does not end before it was, however slow the machine. While it
 * waits it keeps dirtying pages at RATE, writing back what they hold: a job that has done its
 * steps before pre-copy's second scan (a slow machine) still dirties memory, and its output
 * still depends on MEM, RATE and ITERS alone.
 * WORKLOAD_OBJECTS=N makes it hold a few dozen kernel objects as well (objects.h), checked at
 * the end: its output does not change. WORKLOAD_SIGCONT=1 makes it catch SIGCONT, and fail its
 * verdict if one arrived: a job that would see the SIGCONT a rollback may send.
 * Usage: mig_dirty OUTDIR MEM_MIB RATE_MIB_S ITERS [TICKER [THP]] */
#include "ckpt_common.h"
#include "objects.h"
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/syscall.h>

static volatile int done;
static volatile sig_atomic_t sigconts;

static void on_sigcont(int sig) { (void)sig; sigconts++; }
static long long gap_ns = -1, jitter_ns = 0;

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void *ticker(void *arg) {
    (void)arg;
    pid_t last_pid = (pid_t)syscall(SYS_getpid);
    long long last = now_ns();
    while (!done) {
        long long t = now_ns();
        pid_t p = (pid_t)syscall(SYS_getpid);
        if (p != last_pid) {                 /* the first tick in the new process */
            if (t - last > gap_ns) gap_ns = t - last;
            last_pid = p;
        } else if (t - last > jitter_ns) {
            jitter_ns = t - last;
        }
        last = t;
        /* A sleeper wakes promptly when it is due (a busy loop would be preempted for whole
         * time slices on a busy machine, and its gaps would say more about the scheduler). */
        struct timespec nap = { 0, 100000 };
        nanosleep(&nap, NULL);
    }
    return NULL;
}

int main(int argc, char **argv) {
    init(argc, argv);
    if (argc < 5) { fprintf(stderr, "usage: %s OUTDIR MEM_MIB RATE_MIB_S ITERS [TICKER [THP]]\n", argv[0]); return 2; }
    size_t mem = (size_t)atol(argv[2]) << 20;
    double rate = atof(argv[3]);
    long iters = atol(argv[4]);
    int with_ticker = argc > 5 && atoi(argv[5]);
    size_t pages = mem / 4096;
    int thp = argc > 6 && atoi(argv[6]);
    uint64_t *m;
    if (thp) {
        const size_t huge = 2UL << 20;
        char *raw = mmap(NULL, mem + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (raw == MAP_FAILED) return 3;
        m = (uint64_t *)(((uintptr_t)raw + huge - 1) & ~(huge - 1));
        madvise(m, mem, MADV_HUGEPAGE);
    } else {
        m = malloc(mem);
        if (!m) return 3;
    }
    for (size_t i = 0; i < mem / 8; i++) m[i] = i * 0x9E3779B97F4A7C15ull;
    const char *catch_cont = getenv("WORKLOAD_SIGCONT");
    if (catch_cont && atoi(catch_cont)) {
        struct sigaction sa = { .sa_handler = on_sigcont, .sa_flags = SA_RESTART };
        sigemptyset(&sa.sa_mask);
        sigaction(SIGCONT, &sa, NULL);
    }
    const char *failed = objects_make();
    if (failed) { perror(failed); return 3; }
    long per_step = (long)(rate * 256 / 100);      /* pages per 10 ms step */
    if (per_step < 1 && rate > 0) per_step = 1;
    pthread_t t;
    if (with_ticker) pthread_create(&t, NULL, ticker, NULL);
    FILE *out = open_output();
    uint64_t lcg = 12345;
    for (long it = 0; it < iters; it++) {
        for (long k = 0; k < per_step; k++) {
            lcg = lcg * 6364136223846793005ull + 1442695040888963407ull;
            size_t page = (lcg >> 17) % pages;
            uint64_t *p = m + page * 512;
            p[(lcg >> 7) & 511] += lcg ^ (uint64_t)it;
            p[0] ^= (uint64_t)it;
        }
        if (it == 5) ready();
        sleep_ms(10);
    }
    /* WORKLOAD_HOLD, with the ticker still ticking and the pages still written */
    for (long ticks = 0; held(&ticks); ) {
        for (long k = 0; k < per_step; k++) {
            lcg = lcg * 6364136223846793005ull + 1442695040888963407ull;
            volatile uint64_t *p = m + ((lcg >> 17) % pages) * 512 + ((lcg >> 7) & 511);
            *p = *p;
        }
    }
    done = 1;
    if (with_ticker) pthread_join(t, NULL);
    uint64_t sum = 0;
    for (size_t i = 0; i < mem / 8; i++) sum = sum * 31 + m[i];
    fprintf(out, "checksum %016llx after %ld steps\n", (unsigned long long)sum, iters);
    if (with_ticker) {
        char g[64];
        snprintf(g, sizeof g, "%lld %lld\n", gap_ns, jitter_ns);
        write_file("gap", g);
    }
    const char *lost = objects_check();
    if (!lost && sigconts) lost = "a SIGCONT arrived";
    verdict(!lost, "%s", lost ? lost : "");
    return 0;
}
