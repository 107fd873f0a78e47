/* Frozen while blocked: the main thread in nanosleep, a second thread in pthread_cond_wait
 * (a futex wait). After restore neither sees a spurious EINTR or error. */
#include "ckpt_common.h"
#include <pthread.h>

static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t c = PTHREAD_COND_INITIALIZER;
static int go, waiter_rc = -1, waiting;

static void *waiter(void *arg) {
    (void)arg;
    pthread_mutex_lock(&m);
    waiting = 1;
    int rc = 0;
    while (!go && rc == 0) rc = pthread_cond_wait(&c, &m);
    waiter_rc = rc;
    pthread_mutex_unlock(&m);
    return NULL;
}

int main(int argc, char **argv) {
    init(argc, argv);
    FILE *out = open_output();
    pthread_t t;
    pthread_create(&t, NULL, waiter, NULL);
    while (!__atomic_load_n(&waiting, __ATOMIC_SEQ_CST)) sleep_ms(1);
    ready();
    long long ns = 1500000000LL * scale;
    struct timespec ts = { ns / 1000000000LL, ns % 1000000000LL };   /* one raw nanosleep: EINTR would show */
    int rc = nanosleep(&ts, NULL);
    int err = rc ? errno : 0;
    fprintf(out, "nanosleep rc %d errno %d\n", rc, err);
    pthread_mutex_lock(&m);
    go = 1;
    pthread_cond_signal(&c);
    pthread_mutex_unlock(&m);
    pthread_join(t, NULL);
    fprintf(out, "cond_wait rc %d\n", waiter_rc);
    if (rc != 0 || waiter_rc != 0) verdict(0, "nanosleep rc %d errno %d, cond_wait rc %d", rc, err, waiter_rc);
    else verdict(1, "");
    return 0;
}
