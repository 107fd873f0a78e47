/* A process tree for benchmarks: bench_tree DIR PROCESSES MIB [RATE_MIB_S]. The first process
 * forks the others (one level: a launcher and its workers); each fills MIB MiB of its own
 * memory with distinct bytes, then all keep writing to it in 10 ms steps: one byte in each of
 * RATE_MIB_S MiB of pages a second (fractions allowed; 0: no writes), walking their memory with
 * a stride of 64 pages and starting each pass one page further on. Without RATE_MIB_S, one page
 * in 64 every step (all of it every 0.64 s: MIB * 1.56 MiB/s, too fast for live migration to
 * converge on bigger trees). DIR/ready appears once every process has filled its memory. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define STRIDE 64

static double rate_mib_s = -1;      /* < 0: one page in STRIDE every step */

static unsigned char *fill(size_t mib, int id) {
    size_t n = mib << 20;
    unsigned char *a = malloc(n);
    if (!a) _exit(3);
    for (size_t i = 0; i < n; i++) a[i] = (unsigned char)(i * 31 + id);
    return a;
}

static void keep_writing(unsigned char *a, size_t mib) {
    size_t pages = mib << 8, per_pass = pages / STRIDE;
    double per_step = rate_mib_s < 0 ? (double)per_pass : rate_mib_s * 256 / 100;
    uint64_t written = 0;              /* pages written so far: the walk's position */
    for (uint64_t step = 1;; step++) {
        uint64_t due = (uint64_t)(per_step * (double)step);
        for (; written < due; written++) {
            uint64_t pass = written / per_pass, k = written % per_pass;
            a[((pass % STRIDE) + STRIDE * k) * PAGE]++;
        }
        struct timespec ts = { 0, 10000000 };
        nanosleep(&ts, NULL);
    }
}

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    int procs = atoi(argv[2]);
    size_t mib = (size_t)atol(argv[3]);
    if (argc > 4) rate_mib_s = atof(argv[4]);
    if (procs < 1 || mib < 1) return 2;
    int p[2];
    if (pipe(p)) return 3;
    for (int i = 1; i < procs; i++)
        if (fork() == 0) {
            close(p[0]);
            unsigned char *a = fill(mib, i);
            if (write(p[1], "r", 1) != 1) _exit(3);
            keep_writing(a, mib);
        }
    char c;
    for (int i = 1; i < procs; i++) if (read(p[0], &c, 1) != 1) return 3;
    close(p[0]);
    char path[4096];
    snprintf(path, sizeof path, "%s/ready", argv[1]);
    /* The launcher fills its memory last, then says all are ready. */
    unsigned char *a = fill(mib, 0);
    int fd = open(path, O_WRONLY | O_CREAT, 0644);
    close(fd);
    keep_writing(a, mib);
}
