/* A process with many small mappings, a few of them written all the time: the per-mapping
 * cost of checkpoint, restore and live migration (benchmarks/mappings.py, tests/test_mappings.py).
 *
 * Usage: many_maps OUTDIR N HOT CHURN STEPS
 *   N mappings of PAGES pages each, side by side, alternately read-write and read-only (so the
 *   kernel cannot merge them), every page written before it is protected. Every millisecond
 *   the first HOT read-write mappings get a word written; every 10 ms CHURN others change:
 *   unmapped and mapped again with new contents (munmap + mmap at its address), their
 *   protection flipped (mprotect: merged with their neighbours, split off again later), or,
 *   read-only, emptied (MADV_DONTNEED: they read as zeros).
 *   After STEPS steps (0: run until killed) the job checks every word of every mapping and
 *   writes OUTDIR/verdict. On SIGUSR1 it checks at once and writes OUTDIR/verify.PID
 *   ("ok N" or "bad ..."), so a restored copy tells whether its memory came back.
 *   OUTDIR/ready is written once the mappings are made. */
#include "ckpt_common.h"
#include <signal.h>
#include <stdint.h>
#include <sys/mman.h>

#define PAGE 4096UL
#define PAGES 2UL

struct slot { uint64_t salt; uint64_t counter; int prot; int zeroed; };
static struct slot *slots;
static char *base;
static long n;
static volatile sig_atomic_t verify_requested;

static uint64_t word(uintptr_t addr, uint64_t salt) { return (addr * 0x9E3779B97F4A7C15ull) ^ salt; }
static char *slot_addr(long i) { return base + (unsigned long)i * PAGES * PAGE; }
static int base_prot(long i) { return i % 2 == 0 ? PROT_READ | PROT_WRITE : PROT_READ; }

static void fill(long i) {
    uint64_t *p = (uint64_t *)slot_addr(i);
    for (unsigned long k = 0; k < PAGES * PAGE / 8; k++) p[k] = word((uintptr_t)(p + k), slots[i].salt);
    slots[i].counter = 0;
    slots[i].zeroed = 0;
}

/* The first bad slot, or -1; ``bad_word`` says where. */
static long check(long *bad_word) {
    for (long i = 0; i < n; i++) {
        const uint64_t *p = (const uint64_t *)slot_addr(i);
        for (unsigned long k = 0; k < PAGES * PAGE / 8; k++) {
            uint64_t want = slots[i].zeroed ? 0 : k == 0 && slots[i].counter ? slots[i].counter
                                                     : word((uintptr_t)(p + k), slots[i].salt);
            if (p[k] != want) { *bad_word = (long)k; return i; }
        }
    }
    return -1;
}

static void on_usr1(int sig) { (void)sig; verify_requested = 1; }

static uint64_t rng_state = 88172645463325252ull;
static uint64_t rng(void) {
    rng_state ^= rng_state >> 12; rng_state ^= rng_state << 25; rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ULL;
}

static int set_prot(long i, int prot) {
    if (mprotect(slot_addr(i), PAGES * PAGE, prot)) return -1;
    slots[i].prot = prot;
    return 0;
}

int main(int argc, char **argv) {
    init(argc, argv);
    if (argc < 6) { fprintf(stderr, "usage: %s OUTDIR N HOT CHURN STEPS\n", argv[0]); return 2; }
    n = atol(argv[2]);
    long hot = atol(argv[3]), churn = atol(argv[4]), steps = atol(argv[5]) * scale;
    if (n < 2 || hot < 0 || churn < 0 || 2 * hot > n) { fprintf(stderr, "bad N/HOT/CHURN\n"); return 2; }
    FILE *out = open_output();
    slots = calloc(n, sizeof *slots);
    base = mmap(NULL, n * PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (!slots || base == MAP_FAILED) { perror("mmap"); return 3; }
    for (long i = 0; i < n; i++) {
        slots[i].salt = (uint64_t)i * 7919 + 1;
        fill(i);
    }
    for (long i = 0; i < n; i++) {
        slots[i].prot = PROT_READ | PROT_WRITE;
        if (base_prot(i) != slots[i].prot && set_prot(i, base_prot(i))) {
            fprintf(stderr, "mprotect slot %ld of %ld: %s (vm.max_map_count?)\n", i, n, strerror(errno));
            return 3;
        }
    }
    signal(SIGUSR1, on_usr1);
    fprintf(out, "mappings %ld hot %ld churn %ld\n", n, hot, churn);
    ready();
    for (long s = 0; steps == 0 || s < steps; s++) {
        for (long h = 0; h < hot; h++) {
            long i = 2 * h;          /* read-write ones */
            slots[i].counter = ((uint64_t)s << 20) + (uint64_t)h + 1;
            *(uint64_t *)slot_addr(i) = slots[i].counter;
        }
        for (long c = 0; c < (s % 10 == 0 ? churn : 0); c++) {
            /* Leave the hot ones alone: their words are written above, which a read-only one refuses. */
            long i = 2 * hot + (long)(rng() % (uint64_t)(n - 2 * hot));
            uint64_t op = rng() % 3;
            if (op == 2 && !(slots[i].prot & PROT_WRITE)) {
                if (madvise(slot_addr(i), PAGES * PAGE, MADV_DONTNEED)) { verdict(0, "madvise: %s", strerror(errno)); return 1; }
                slots[i].zeroed = 1;
            } else if (op == 1) {
                char *a = slot_addr(i);
                if (munmap(a, PAGES * PAGE)) { verdict(0, "munmap: %s", strerror(errno)); return 1; }
                char *b = mmap(a, PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
                               -1, 0);
                if (b != a) { verdict(0, "mmap again at %p: %s", (void *)a, strerror(errno)); return 1; }
                slots[i].salt = rng() | 1;
                fill(i);
                if (base_prot(i) != (PROT_READ | PROT_WRITE) && set_prot(i, base_prot(i))) {
                    verdict(0, "mprotect: %s", strerror(errno)); return 1;
                }
                slots[i].prot = base_prot(i);
            } else {
                int prot = slots[i].prot == base_prot(i) ? (base_prot(i) ^ PROT_WRITE) : base_prot(i);
                if (set_prot(i, prot)) { verdict(0, "mprotect: %s", strerror(errno)); return 1; }
            }
        }
        if (verify_requested) {
            verify_requested = 0;
            long k = -1, bad = check(&k);
            char name[64], text[256];
            snprintf(name, sizeof name, "verify.%d", getpid());
            if (bad < 0) snprintf(text, sizeof text, "ok %ld\n", n);
            else snprintf(text, sizeof text, "bad slot %ld word %ld of %ld slots\n", bad, k, n);
            write_file(name, text);
        }
        sleep_ms(1);
    }
    long k = -1, bad = check(&k);
    if (bad >= 0) { verdict(0, "slot %ld word %ld changed", bad, k); return 1; }
    fprintf(out, "checked %ld mappings after %ld steps\n", n, steps);
    verdict(1, "");
    return 0;
}
