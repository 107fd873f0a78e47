/* For benchmarks/tracker.py: a process with MIB MiB of populated private memory that dirties
 * pages on command. Usage: dirty_bench OUTDIR MIB [thp]
 * With "thp" the memory is 2 MiB aligned and asks for transparent huge pages (MADV_HUGEPAGE),
 * without it it refuses them (MADV_NOHUGEPAGE).
 * Prints "ready ADDR NPAGES" once every page is touched; then reads commands on stdin:
 *   "dirty PPM SEED"  write one new byte into PPM per million of its pages (chosen at random,
 *                     distinct), answer "ok N";
 *   "quit"            exit. */
#include "ckpt_common.h"
#include <stdint.h>
#include <sys/mman.h>

#define PAGE 4096UL
#define HUGE (2UL << 20)

int main(int argc, char **argv) {
    init(argc, argv);
    if (argc < 3) { fprintf(stderr, "usage: %s OUTDIR MIB [thp]\n", argv[0]); return 2; }
    unsigned long npages = strtoul(argv[2], NULL, 0) * (1UL << 20) / PAGE;
    int thp = argc > 3 && strcmp(argv[3], "thp") == 0;
    unsigned char *raw = mmap(NULL, npages * PAGE + HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) { perror("mmap"); return 3; }
    unsigned char *mem = (unsigned char *)(((uintptr_t)raw + HUGE - 1) & ~(HUGE - 1));
    madvise(mem, npages * PAGE, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    for (unsigned long i = 0; i < npages; i++) memset(mem + i * PAGE, (int)(i * 7 + 1), PAGE);
    unsigned char *mark = calloc(npages, 1);
    printf("ready %#lx %lu\n", (unsigned long)mem, npages);
    fflush(stdout);
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        unsigned long ppm, seed;
        if (sscanf(line, "dirty %lu %lu", &ppm, &seed) == 2) {
            uint64_t x = seed * 2654435761UL | 1;
            unsigned long want = npages * ppm / 1000000, n = 0;
            memset(mark, 0, npages);
            while (n < want) {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                unsigned long i = x % npages;
                if (mark[i]) continue;
                mark[i] = 1;
                mem[i * PAGE + (x >> 40) % PAGE] += 1;
                n++;
            }
            printf("ok %lu\n", n);
            fflush(stdout);
        } else if (strncmp(line, "quit", 4) == 0) {
            return 0;
        }
    }
    return 0;
}
