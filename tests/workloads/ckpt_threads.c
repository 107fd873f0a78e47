/* Four pthreads taking turns under a mutex and condition variable, with thread-local
 * counters. After restore: threads exit, pthread_join returns, gettid() matches /proc,
 * and pthread_kill (which uses glibc's cached tid) reaches the right thread. */
#include "ckpt_common.h"
#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>

#define THREADS 4
static int ROUNDS = 150;
static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t c = PTHREAD_COND_INITIALIZER;
static __thread long tls_counter;
static __thread volatile pid_t tls_hit;
static long total;
static int turn;
static int ready_count;
static FILE *out;

static void on_usr1(int sig) { (void)sig; tls_hit = (pid_t)syscall(SYS_gettid); }

static void *worker(void *arg) {
    long id = (long)arg;
    for (int i = 0; i < ROUNDS; i++) {
        pthread_mutex_lock(&m);
        while (turn != id) pthread_cond_wait(&c, &m);
        tls_counter++;
        total += id + i;
        if (i == 10 && ++ready_count == THREADS) ready();
        /* Held (WORKLOAD_HOLD), thread 0 waits here, its turn and the mutex held, until the
         * test lets it go: on a busy machine a late checkpoint still finds every thread. */
        if (id == 0 && i == ROUNDS - 5) hold_on();
        turn = (turn + 1) % THREADS;
        pthread_cond_broadcast(&c);
        pthread_mutex_unlock(&m);
        sleep_ms(4);
    }
    pid_t tid = (pid_t)syscall(SYS_gettid);
    char path[64];
    snprintf(path, sizeof path, "/proc/self/task/%d", tid);
    int in_proc = access(path, F_OK) == 0;
    pthread_kill(pthread_self(), SIGUSR1);
    int kill_ok = tls_hit == tid;
    return (void *)(tls_counter * 100 + in_proc * 10 + kill_ok);
}

int main(int argc, char **argv) {
    init(argc, argv);
    ROUNDS *= scale;
    signal(SIGUSR1, on_usr1);
    out = open_output();
    pthread_t th[THREADS];
    for (long i = 0; i < THREADS; i++) pthread_create(&th[i], NULL, worker, (void *)i);
    long results = 0;
    int bad = 0;
    for (int i = 0; i < THREADS; i++) {
        void *r;
        if (pthread_join(th[i], &r) != 0) bad = 1;
        results += (long)r;
        fprintf(out, "thread %d result %ld\n", i, (long)r);
    }
    fprintf(out, "total %ld\n", total);
    if (bad || results != THREADS * (ROUNDS * 100 + 11)) verdict(0, "results %ld", results);
    else verdict(1, "");
    return 0;
}
