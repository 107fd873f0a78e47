/* A small process that holds one of most things an image carries, for the restore fuzz test
 * (tests/_fuzz.py): two threads (one in a futex wait, on an SS_AUTODISARM alternate signal
 * stack), a signal handler and a blocked signal, an interval timer, a pipe with bytes in it,
 * an eventfd, an open file, heap, a private file mapping and shared anonymous memory; with a
 * second argument, that many MiB more of heap. After ready it sleeps until killed: the fuzz
 * harness kills whatever restores. */
#include "ckpt_common.h"
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/time.h>

#ifndef SS_AUTODISARM
#define SS_AUTODISARM (1U << 31)     /* <linux/signal.h>; glibc's headers lack it */
#endif

static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t c = PTHREAD_COND_INITIALIZER;
static volatile sig_atomic_t hits;

static void on_signal(int sig) { (void)sig; hits++; }

static void *waiter(void *arg) {
    (void)arg;
    /* An alternate signal stack that disarms itself while in use: SS_AUTODISARM is the top
     * bit of the int ss_flags. */
    static char altstack[16384];
    stack_t ss = { .ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = SS_AUTODISARM };
    if (sigaltstack(&ss, NULL) != 0) { perror("sigaltstack"); exit(3); }
    pthread_mutex_lock(&m);
    for (;;) pthread_cond_wait(&c, &m);
    return NULL;
}

int main(int argc, char **argv) {
    init(argc, argv);
    FILE *out = open_output();
    fprintf(out, "started\n");
    struct sigaction sa = { .sa_handler = on_signal, .sa_flags = SA_RESTART };
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGALRM, &sa, NULL);
    sigset_t block;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR2);
    sigprocmask(SIG_BLOCK, &block, NULL);
    struct itimerval it = { { 3600, 0 }, { 3600, 0 } };
    setitimer(ITIMER_REAL, &it, NULL);
    int p[2];
    if (pipe(p) != 0 || write(p[1], "in flight", 9) != 9) { perror("pipe"); return 3; }
    int efd = eventfd(7, EFD_CLOEXEC);
    if (efd < 0) { perror("eventfd"); return 3; }
    char *heap = malloc(1 << 16);
    memset(heap, 0x5a, 1 << 16);
    long extra = argc > 2 ? atol(argv[2]) << 20 : 0;      /* MiB more, for a restore that takes a while */
    char *more = extra ? malloc(extra) : NULL;
    for (long i = 0; i < extra; i++) more[i] = (char)(i * 7 + i / 4096);
    void *lib = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, open(argv[0], O_RDONLY | O_CLOEXEC), 0);
    char *shared = mmap(NULL, 3 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (lib == MAP_FAILED || shared == MAP_FAILED) { perror("mmap"); return 3; }
    memcpy(shared + 4096, "shared", 6);
    pthread_t t;
    pthread_create(&t, NULL, waiter, NULL);
    ready();
    for (;;) pause();
}
