/* A pool forked after loading its data: bench_cow DIR MIB WORKERS. The process fills MIB MiB
 * of private anonymous memory with bytes that do not compress, then forks WORKERS workers,
 * which share it copy-on-write; each writes one page of it, then all wait. DIR/ready appears
 * once every worker has written its page. WORKERS 0: the process alone (the anchor). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    size_t n = (size_t)atol(argv[2]) << 20;
    int workers = atoi(argv[3]);
    if (n == 0 || workers < 0) return 2;
    uint64_t *a = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED) return 3;
    uint64_t x = 88172645463325252ULL;
    for (size_t i = 0; i < n / 8; i++) {       /* xorshift64: bytes that do not compress */
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        a[i] = x;
    }
    int p[2];
    if (pipe(p)) return 3;
    for (int k = 0; k < workers; k++)
        if (fork() == 0) {
            ((unsigned char *)a)[(size_t)(k + 1) * 7 * PAGE % n] ^= 1;
            if (write(p[1], "r", 1) != 1) _exit(3);
            for (;;) pause();
        }
    char c;
    for (int k = 0; k < workers; k++) if (read(p[0], &c, 1) != 1) return 3;
    char path[4096];
    size_t len = 0;
    for (const char *s = argv[1]; *s && len < sizeof path - 8; s++) path[len++] = *s;
    for (const char *s = "/ready"; *s; s++) path[len++] = *s;
    path[len] = 0;
    close(open(path, O_WRONLY | O_CREAT, 0644));
    for (;;) pause();
}
