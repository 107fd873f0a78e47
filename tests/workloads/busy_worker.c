/* A CPU-busy job for the rebalancer's tests: STEPS steps of a fixed computation over MEM_MIB
 * MiB (a fixed amount of work each, so the output never depends on timing), each followed by
 * a sleep that keeps it busy about DUTY percent of the time: a process with a known CPU share
 * whose result a move must not change.
 * With WORKLOAD_HOLD=PATH it stops after the first hundred steps that end with PATH there: its
 * output is then the first lines of a longer run's (a test lets it go once it has moved).
 * Usage: busy_worker OUTDIR DUTY_PERCENT STEPS MEM_MIB */
#include "ckpt_common.h"
#include <stdint.h>

static long long cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);   /* CPU time: the duty holds on a busy machine too */
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv) {
    init(argc, argv);
    if (argc < 5) { fprintf(stderr, "usage: %s OUTDIR DUTY_PERCENT STEPS MEM_MIB\n", argv[0]); return 2; }
    int duty = atoi(argv[2]);
    long steps = atol(argv[3]);
    size_t words = ((size_t)atol(argv[4]) << 20) / 8;
    if (duty < 1 || duty > 100 || steps < 1 || words < 512) return 2;
    uint64_t *m = malloc(words * 8);
    if (!m) return 3;
    for (size_t i = 0; i < words; i++) m[i] = i * 0x9E3779B97F4A7C15ull;
    FILE *out = open_output();
    uint64_t lcg = 42;
    for (long s = 0; s < steps; s++) {
        long long t0 = cpu_ns();
        for (int k = 0; k < 200000; k++) {       /* the fixed work of a step */
            lcg = lcg * 6364136223846793005ull + 1442695040888963407ull;
            m[(lcg >> 20) % words] += lcg >> 3;
        }
        long long spent = cpu_ns() - t0;
        long long rest = spent * (100 - duty) / duty;
        if (rest > 0) {
            struct timespec ts = { rest / 1000000000LL, rest % 1000000000LL };
            while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
        }
        if (s == 3) ready();
        if (s % 100 == 99) {
            uint64_t sum = 0;
            for (size_t i = 0; i < words; i += 61) sum = sum * 31 + m[i];
            fprintf(out, "step %ld checksum %016llx\n", s + 1, (unsigned long long)sum);
            const char *hold = getenv("WORKLOAD_HOLD");
            if (hold && *hold && access(hold, F_OK) == 0) break;
        }
    }
    verdict(1, "");
    return 0;
}
