/* Scheduling per thread, which came back lost: nice values, SCHED_RR with a priority and
 * SCHED_RESET_ON_FORK, SCHED_BATCH, pinning to one CPU, timer slack and I/O priority. Each thread sets its
 * own, the process is frozen, and each thread then checks its own (the main thread too). */
#include "ckpt_common.h"
#include <pthread.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>

struct want {
    int nice, policy, priority, reset_on_fork, cpu;   /* cpu -1: not pinned */
    int ioprio;                                       /* ionice: class << 13 | level; 0: none */
    unsigned long slack;
    char why[128];
};

static pthread_barrier_t set_up, check;
static int last_cpu;

static pid_t tid(void) { return (pid_t)syscall(SYS_gettid); }

static int apply(struct want *w) {
    if (w->policy != SCHED_OTHER || w->reset_on_fork) {
        struct sched_param p = { .sched_priority = w->priority };
        if (sched_setscheduler(0, w->policy | (w->reset_on_fork ? SCHED_RESET_ON_FORK : 0), &p)) return -1;
    }
    if (setpriority(PRIO_PROCESS, tid(), w->nice)) return -1;
    if (w->cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(w->cpu, &set);
        if (sched_setaffinity(0, sizeof set, &set)) return -1;
    }
    if (w->slack && prctl(PR_SET_TIMERSLACK, w->slack, 0, 0, 0)) return -1;
    if (w->ioprio && syscall(SYS_ioprio_set, 1, tid(), w->ioprio)) return -1;
    return 0;
}

static void verify(struct want *w) {
    int policy = sched_getscheduler(0);
    struct sched_param p;
    sched_getparam(0, &p);
    errno = 0;
    int nice = getpriority(PRIO_PROCESS, tid());
    cpu_set_t set;
    sched_getaffinity(0, sizeof set, &set);
    unsigned long slack = (unsigned long)prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0);
    w->why[0] = 0;
    if ((policy & ~SCHED_RESET_ON_FORK) != w->policy) strcat(w->why, "policy ");
    if (!!(policy & SCHED_RESET_ON_FORK) != w->reset_on_fork) strcat(w->why, "reset-on-fork ");
    if (p.sched_priority != w->priority) strcat(w->why, "priority ");
    if (nice != w->nice) strcat(w->why, "nice ");
    if (w->cpu >= 0 ? CPU_COUNT(&set) != 1 || !CPU_ISSET(w->cpu, &set) : CPU_COUNT(&set) < last_cpu + 1)
        strcat(w->why, "affinity ");
    if (w->slack && slack != w->slack) strcat(w->why, "timer slack ");
    long io = syscall(SYS_ioprio_get, 1, tid());
    if (w->ioprio && io != w->ioprio) strcat(w->why, "I/O priority ");
}

static void *thread(void *arg) {
    struct want *w = arg;
    if (apply(w)) snprintf(w->why, sizeof w->why, "set-up failed: %s ", strerror(errno));
    pthread_barrier_wait(&set_up);
    pthread_barrier_wait(&check);
    if (!w->why[0]) verify(w);
    return NULL;
}

int main(int argc, char **argv) {
    init(argc, argv);
    FILE *out = open_output();
    last_cpu = (int)sysconf(_SC_NPROCESSORS_ONLN) - 1;
    struct want wants[] = {
        { .nice = 5, .policy = SCHED_OTHER, .cpu = -1, .slack = 123456, .ioprio = 3 << 13 },  /* main: idle I/O */
        { .nice = 0, .policy = SCHED_RR, .priority = 10, .reset_on_fork = 1, .cpu = -1, .slack = 0 },
        { .nice = 7, .policy = SCHED_BATCH, .cpu = last_cpu, .slack = 2000000, .ioprio = (2 << 13) | 6 },
        { .nice = -3, .policy = SCHED_OTHER, .cpu = 0, .slack = 1 },
        { .nice = 19, .policy = SCHED_IDLE, .cpu = -1, .slack = 0 },
    };
    int n = sizeof wants / sizeof wants[0];
    pthread_barrier_init(&set_up, NULL, n);
    pthread_barrier_init(&check, NULL, n);
    pthread_t threads[8];
    for (int i = 1; i < n; i++) pthread_create(&threads[i], NULL, thread, &wants[i]);
    if (apply(&wants[0])) { perror("set-up"); return 3; }
    pthread_barrier_wait(&set_up);
    ready();
    linger(50);
    pthread_barrier_wait(&check);
    verify(&wants[0]);
    for (int i = 1; i < n; i++) pthread_join(threads[i], NULL);
    char why[1024] = "";
    for (int i = 0; i < n; i++)
        if (wants[i].why[0]) snprintf(why + strlen(why), sizeof why - strlen(why), "thread %d: %s; ", i, wants[i].why);
    fprintf(out, "scheduling checked: %s\n", why[0] ? why : "all good");
    verdict(!why[0], "%s", why);
    return 0;
}
