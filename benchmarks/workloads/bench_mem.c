/* Benchmark workload: a process holding MIB MiB of realistic data, for benchmarks/checkpoint.py.
 *
 * Usage: bench_mem OUTDIR MIB [SEED]   fill MIB MiB, write OUTDIR/info, then OUTDIR/ready, wait
 *        bench_mem OUTDIR MIB blank    map MIB MiB without touching it (a target for raw writes)
 *
 * The data is a deterministic mix, page by page: zero pages (written, so they are populated),
 * text-like pages (words, numbers and punctuation, as logs and documents look) and random
 * pages (as compressed or encrypted data look). OUTDIR/info records the region's address,
 * the page counts of each kind and the checksum of the whole region.
 *
 * The process then waits. On SIGUSR1 it checks its memory against per-page hashes it keeps
 * (they are part of its memory too) and writes OUTDIR/verify.PID:
 *     checksum HEX bad_pages N first_bad ADDR
 * so a restored copy (a new pid) reports whether its memory came back bit for bit.
 *
 * With BENCH_THREADS=N in the environment (N > 1), N - 1 more threads wait beside the main
 * one (each blocked in pause() with SIGUSR1 blocked, on a stack of its own): a multi-threaded
 * process to checkpoint. Build with -pthread.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096u

static const char *outdir;
static volatile sig_atomic_t verify_requested;

static void write_file(const char *name, const char *text) {
    char path[4096], tmp[4200];
    snprintf(path, sizeof path, "%s/%s", outdir, name);
    snprintf(tmp, sizeof tmp, "%s/.%s.tmp", outdir, name);
    FILE *f = fopen(tmp, "w");
    if (!f) { perror(tmp); exit(3); }
    fputs(text, f);
    if (fclose(f) != 0) { perror(tmp); exit(3); }
    if (rename(tmp, path) != 0) { perror(path); exit(3); }
}

static uint64_t rng_state;

static uint64_t rng(void) {                 /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}

/* A hash of one page that also depends on where the page is. */
static uint64_t page_hash(const uint64_t *p, uint64_t index) {
    uint64_t h = 0xcbf29ce484222325ull ^ (index * 0x9E3779B97F4A7C15ull);
    uint64_t g = 0x84222325cbf29ce4ull;
    for (unsigned i = 0; i < PAGE / 8; i += 2) {        /* two independent chains: faster */
        h = (h ^ p[i]) * 0x100000001B3ull;
        g = (g ^ p[i + 1]) * 0x100000001B3ull;
        h ^= h >> 29;
        g ^= g >> 31;
    }
    return h ^ (g * 0x9E3779B97F4A7C15ull);
}

static uint64_t region_checksum(const uint64_t *hashes, size_t pages) {
    uint64_t sum = 0x6a09e667f3bcc908ull;
    for (size_t i = 0; i < pages; i++)
        sum = (sum ^ hashes[i]) * 0x100000001B3ull + (sum >> 17);
    return sum;
}

static const char *const WORDS[] = {
    "the", "process", "memory", "page", "request", "server", "error", "status", "user", "session",
    "time", "value", "connection", "checkpoint", "restore", "migrate", "kernel", "thread", "file",
    "buffer", "cache", "client", "response", "GET", "POST", "/api/v1/items", "timeout", "retry",
    "ok", "INFO", "WARN", "DEBUG", "handler", "queue", "worker", "latency", "bytes", "id", "of",
    "and", "to", "in", "is", "for", "with", "on", "that", "this", "from", "at",
};
#define NWORDS (sizeof WORDS / sizeof *WORDS)

static void fill_text(char *p) {
    size_t n = 0;
    while (n < PAGE) {
        char piece[64];
        int len;
        uint64_t r = rng();
        switch (r % 16) {
        case 0: len = snprintf(piece, sizeof piece, "%llu ", (unsigned long long)(r >> 20) % 100000); break;
        case 1: len = snprintf(piece, sizeof piece, "\n2024-05-%02u %02u:%02u:%02u ", (unsigned)(r >> 8) % 28 + 1,
                               (unsigned)(r >> 16) % 24, (unsigned)(r >> 24) % 60, (unsigned)(r >> 32) % 60); break;
        case 2: len = snprintf(piece, sizeof piece, "%s=%u, ", WORDS[(r >> 8) % NWORDS], (unsigned)(r >> 32) % 1000); break;
        default: len = snprintf(piece, sizeof piece, "%s ", WORDS[(r >> 8) % NWORDS]); break;
        }
        if ((size_t)len > PAGE - n) len = (int)(PAGE - n);
        memcpy(p + n, piece, (size_t)len);
        n += (size_t)len;
    }
}

static void on_usr1(int sig) { (void)sig; verify_requested = 1; }

static void *idle_thread(void *arg) {
    (void)arg;
    for (;;) pause();
    return NULL;
}

/* BENCH_THREADS - 1 idle threads; they inherit the caller's mask (SIGUSR1 blocked). */
static void start_threads(void) {
    const char *env = getenv("BENCH_THREADS");
    long n = env ? strtol(env, NULL, 10) : 1;
    for (long i = 1; i < n; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, idle_thread, NULL) != 0) { perror("pthread_create"); exit(3); }
    }
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: %s OUTDIR MIB [SEED|blank]\n", argv[0]); return 2; }
    outdir = argv[1];
    size_t bytes = (size_t)strtoull(argv[2], NULL, 10) << 20;
    size_t pages = bytes / PAGE;
    int blank = argc > 3 && strcmp(argv[3], "blank") == 0;
    rng_state = argc > 3 && !blank ? strtoull(argv[3], NULL, 0) | 1 : 0x9E3779B97F4A7C15ull;

    unsigned char *mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) { perror("mmap"); return 3; }
    char info[512];
    if (blank) {
        snprintf(info, sizeof info, "addr %#llx\nbytes %zu\n", (unsigned long long)(uintptr_t)mem, bytes);
        write_file("info", info);
        write_file("ready", "ready\n");
        for (;;) pause();
    }

    uint64_t *hashes = malloc(pages * sizeof *hashes);
    if (!hashes) { perror("malloc"); return 3; }
    size_t kinds[3] = {0, 0, 0};                 /* zero, text, random */
    for (size_t i = 0; i < pages; i++) {
        unsigned char *p = mem + i * PAGE;
        unsigned kind = (unsigned)(rng() % 10);
        kind = kind < 3 ? 0 : kind < 7 ? 1 : 2;      /* 30% zero, 40% text, 30% random */
        kinds[kind]++;
        if (kind == 0) {
            *(volatile unsigned char *)p = 0;        /* populated, and zero */
        } else if (kind == 1) {
            fill_text((char *)p);
        } else {
            uint64_t *q = (uint64_t *)p;
            for (unsigned j = 0; j < PAGE / 8; j++) q[j] = rng();
        }
        hashes[i] = page_hash((const uint64_t *)p, i);
    }
    uint64_t checksum = region_checksum(hashes, pages);

    sigset_t usr1, waitmask;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    sigprocmask(SIG_BLOCK, &usr1, &waitmask);   /* waitmask: the mask without SIGUSR1 blocked */
    sigdelset(&waitmask, SIGUSR1);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    start_threads();

    snprintf(info, sizeof info, "addr %#llx\nbytes %zu\nzero_pages %zu\ntext_pages %zu\nrandom_pages %zu\n"
             "checksum %016llx\n", (unsigned long long)(uintptr_t)mem, bytes, kinds[0], kinds[1], kinds[2],
             (unsigned long long)checksum);
    write_file("info", info);
    write_file("ready", "ready\n");

    for (;;) {
        while (!verify_requested) sigsuspend(&waitmask);
        verify_requested = 0;
        size_t bad = 0, first_bad = 0;
        uint64_t sum = 0x6a09e667f3bcc908ull;
        for (size_t i = 0; i < pages; i++) {
            uint64_t h = page_hash((const uint64_t *)(mem + i * PAGE), i);
            if (h != hashes[i] && bad++ == 0) first_bad = i;
            sum = (sum ^ h) * 0x100000001B3ull + (sum >> 17);
        }
        char name[64], text[256];
        snprintf(name, sizeof name, "verify.%d", (int)getpid());
        snprintf(text, sizeof text, "checksum %016llx bad_pages %zu first_bad %#llx\n", (unsigned long long)sum,
                 bad, bad ? (unsigned long long)(uintptr_t)(mem + first_bad * PAGE) : 0ull);
        write_file(name, text);
    }
}
