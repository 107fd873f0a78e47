/* A process tree for benchmarks: bench_tree DIR PROCESSES MIB. The first process forks the
 * others (one level: a launcher and its workers); each fills MIB MiB of its own memory with
 * distinct bytes, then all keep writing one page in 64 every 10 ms. DIR/ready appears once
 * every process has filled its memory. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void work(size_t mib, int id, int ready_fd) {
    size_t n = mib << 20;
    unsigned char *a = malloc(n);
    if (!a) _exit(3);
    for (size_t i = 0; i < n; i++) a[i] = (unsigned char)(i * 31 + id);
    if (write(ready_fd, "r", 1) != 1) _exit(3);
    for (unsigned round = 0;; round++) {
        for (size_t off = (round % 64) * 4096; off < n; off += 64 * 4096) a[off]++;
        struct timespec ts = { 0, 10000000 };
        nanosleep(&ts, NULL);
    }
}

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    int procs = atoi(argv[2]);
    size_t mib = (size_t)atol(argv[3]);
    int p[2];
    if (pipe(p)) return 3;
    for (int i = 1; i < procs; i++)
        if (fork() == 0) { close(p[0]); work(mib, i, p[1]); }
    char c;
    for (int i = 1; i < procs; i++) if (read(p[0], &c, 1) != 1) return 3;
    close(p[0]);
    char path[4096];
    snprintf(path, sizeof path, "%s/ready", argv[1]);
    /* The launcher fills its memory last, then says all are ready. */
    size_t n = mib << 20;
    unsigned char *a = malloc(n);
    if (!a) return 3;
    for (size_t i = 0; i < n; i++) a[i] = (unsigned char)(i * 31);
    int fd = open(path, O_WRONLY | O_CREAT, 0644);
    close(fd);
    for (unsigned round = 0;; round++) {
        for (size_t off = (round % 64) * 4096; off < n; off += 64 * 4096) a[off]++;
        struct timespec ts = { 0, 10000000 };
        nanosleep(&ts, NULL);
    }
}
