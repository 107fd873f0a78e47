/* A tracked process must not notice: tracking starts while the main thread is inside one raw
 * nanosleep and a second thread is blocked in read(); signals arrive while it is tracked.
 * Usage: dirty_undisturbed OUTDIR NSIGNALS
 * Output (deterministic): nanosleep and read results, a checksum of 8 MiB written in a fixed
 * pattern, and the number of SIGRTMIN signals handled (it waits for NSIGNALS of them, which
 * should come once OUTDIR/busy exists: a handler would end the nanosleep early). */
#include "ckpt_common.h"
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/mman.h>

#define PAGE 4096UL
#define NPAGES 2048UL

static int pipefd[2];
static char got[16];
static ssize_t read_rc = -2;
static int read_errno;
static volatile sig_atomic_t signals;

static void on_signal(int sig) { (void)sig; signals++; }

static void *reader(void *arg) {
    (void)arg;
    read_rc = read(pipefd[0], got, sizeof got - 1);   /* blocks until main writes */
    read_errno = read_rc < 0 ? errno : 0;
    return NULL;
}

int main(int argc, char **argv) {
    init(argc, argv);
    int want = argc > 2 ? atoi(argv[2]) : 0;
    FILE *out = open_output();
    struct sigaction sa = { .sa_handler = on_signal, .sa_flags = SA_RESTART };
    sigemptyset(&sa.sa_mask);
    sigaction(SIGRTMIN, &sa, NULL);
    uint64_t *mem = mmap(NULL, NPAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) { perror("mmap"); return 3; }
    uint64_t x = 88172645463325252ULL;
    for (unsigned long i = 0; i < NPAGES * PAGE / 8; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; mem[i] = x; }
    if (pipe(pipefd)) { perror("pipe"); return 3; }
    pthread_t t;
    pthread_create(&t, NULL, reader, NULL);
    ready();
    struct timespec ts = { 0, 700000000 };   /* one raw nanosleep: an EINTR would show */
    int rc = nanosleep(&ts, NULL);
    int err = rc ? errno : 0;
    fprintf(out, "nanosleep rc %d errno %d\n", rc, err);
    if (write(pipefd[1], "hello", 5) != 5) { perror("write"); return 3; }
    pthread_join(t, NULL);
    fprintf(out, "read rc %zd errno %d '%s'\n", read_rc, read_errno, got);
    write_file("busy", "busy\n");               /* signals are welcome from here on */
    for (int iter = 0; iter < 150; iter++) {       /* a fixed pattern of writes, while tracked */
        for (unsigned long k = 0; k < 64; k++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            mem[x % (NPAGES * PAGE / 8)] += x | 1;
        }
        sleep_ms(2);
    }
    while (signals < want) sleep_ms(1);
    uint64_t sum = 0;
    for (unsigned long i = 0; i < NPAGES * PAGE / 8; i++) sum = sum * 31 + mem[i];
    fprintf(out, "checksum %016llx\nsignals %d\n", (unsigned long long)sum, (int)signals);
    if (rc != 0 || read_rc != 5) verdict(0, "nanosleep rc %d errno %d, read rc %zd", rc, err, read_rc);
    else verdict(1, "");
    return 0;
}
