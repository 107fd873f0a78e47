/* A process without a vDSO, as one run under valgrind is (or a sandbox that unmaps it):
 * kcr-migrate borrows a syscall instruction from the vDSO to run system calls in a process,
 * and must find one in its code instead. It unmaps [vdso] (and [vvar]), then never calls
 * what glibc routes through it (clock_gettime, gettimeofday, time, getcpu). A second thread
 * fills memory with a pattern, waits in read() on a pipe through the move, and fills it
 * again. Output: the memory's checksum and that the vDSO stayed away. */
#include "ckpt_common.h"
#include <pthread.h>
#include <sys/auxv.h>
#include <sys/mman.h>

#define WORDS (4 << 20) / 8

static unsigned long *buf;
static int go[2];

static void fill(unsigned long seed) {
    for (long i = 0; i < WORDS; i++) buf[i] = seed = seed * 6364136223846793005UL + 1442695040888963407UL;
}

static void *filler(void *arg) {
    (void)arg;
    fill(1);
    unsigned long seed;
    if (read(go[0], &seed, sizeof seed) != sizeof seed) return (void *)1;
    fill(seed);
    return NULL;
}

static int vdso_mapped(void) {
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512];
    int found = 0;
    while (f && fgets(line, sizeof line, f))
        if (strstr(line, "[vdso]") || strstr(line, "[vvar")) found = 1;
    if (f) fclose(f);
    return found;
}

int main(int argc, char **argv) {
    init(argc, argv);
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512];
    while (f && fgets(line, sizeof line, f)) {
        unsigned long start, end;
        if ((strstr(line, "[vdso]") || strstr(line, "[vvar")) && sscanf(line, "%lx-%lx", &start, &end) == 2)
            if (munmap((void *)start, end - start) != 0) { verdict(0, "munmap: %s", strerror(errno)); return 1; }
    }
    fclose(f);
    if (vdso_mapped()) { verdict(0, "the vDSO is still mapped"); return 1; }
    buf = malloc(WORDS * 8);
    pthread_t t;
    if (pipe(go) != 0 || pthread_create(&t, NULL, filler, NULL) != 0) { verdict(0, "no pipe or thread"); return 1; }
    while (!__atomic_load_n(&buf[WORDS - 1], __ATOMIC_ACQUIRE)) sleep_ms(1);
    ready();
    linger(30);
    unsigned long seed = buf[WORDS - 1];
    void *failed;
    if (write(go[1], &seed, sizeof seed) != sizeof seed || pthread_join(t, &failed) != 0 || failed) {
        verdict(0, "the filler thread did not go on");
        return 1;
    }
    unsigned long sum = 0;
    for (long i = 0; i < WORDS; i++) sum += buf[i] ^ (unsigned long)i;
    FILE *out = open_output();
    fprintf(out, "sum %lx\nvdso %s\n", sum, vdso_mapped() ? "mapped" : "absent");
    fclose(out);
    verdict(!vdso_mapped(), "a vDSO came back");
    return 0;
}
