/* Kernel objects an event-loop program holds, for a job that should carry a few dozen of them
 * (WORKLOAD_OBJECTS=N: N each of eventfd, timerfd, pipe and socketpair with bytes in flight,
 * the eventfds and timerfds in one epoll set; one signalfd, one inotify watch on OUTDIR, one
 * shared flock and one POSIX timer). objects_check() says whether each still holds what it was
 * given: counters, bytes in flight, armed timers, the epoll set's readiness.
 * Include after ckpt_common.h. */
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/inotify.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>

#define OBJECTS_MAX 64
#define IN_FLIGHT "sixteen bytes..."

static int objects_n;
static int obj_event[OBJECTS_MAX], obj_timer[OBJECTS_MAX], obj_pipe[OBJECTS_MAX][2], obj_pair[OBJECTS_MAX][2];
static int obj_epoll = -1, obj_signal = -1, obj_inotify = -1, obj_lock = -1;
static timer_t obj_posix;

/* 0, or a step that failed (the job reports it and exits). */
__attribute__((unused)) static const char *objects_make(void) {
    const char *n = getenv("WORKLOAD_OBJECTS");
    objects_n = n ? atoi(n) : 0;
    if (objects_n <= 0) return NULL;
    if (objects_n > OBJECTS_MAX) objects_n = OBJECTS_MAX;
    if ((obj_epoll = epoll_create1(0)) < 0) return "epoll_create1";
    struct itimerspec far = { { 3600, 0 }, { 3600, 0 } };
    for (int i = 0; i < objects_n; i++) {
        if ((obj_event[i] = eventfd(i + 1, EFD_NONBLOCK)) < 0) return "eventfd";
        if ((obj_timer[i] = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK)) < 0) return "timerfd_create";
        if (timerfd_settime(obj_timer[i], 0, &far, NULL) != 0) return "timerfd_settime";
        struct epoll_event ev = { .events = EPOLLIN, .data.u32 = (uint32_t)i };
        if (epoll_ctl(obj_epoll, EPOLL_CTL_ADD, obj_event[i], &ev) != 0) return "epoll_ctl eventfd";
        ev.data.u32 = (uint32_t)(OBJECTS_MAX + i);
        if (epoll_ctl(obj_epoll, EPOLL_CTL_ADD, obj_timer[i], &ev) != 0) return "epoll_ctl timerfd";
        if (pipe2(obj_pipe[i], O_NONBLOCK) != 0) return "pipe2";
        if (write(obj_pipe[i][1], IN_FLIGHT, 16) != 16) return "pipe write";
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, obj_pair[i]) != 0) return "socketpair";
        if (write(obj_pair[i][0], IN_FLIGHT, 16) != 16) return "socket write";
    }
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGUSR2);
    if (sigprocmask(SIG_BLOCK, &mask, NULL) != 0) return "sigprocmask";
    if ((obj_signal = signalfd(-1, &mask, SFD_NONBLOCK)) < 0) return "signalfd";
    if ((obj_inotify = inotify_init1(IN_NONBLOCK)) < 0) return "inotify_init1";
    if (inotify_add_watch(obj_inotify, outdir, IN_CREATE | IN_DELETE) < 0) return "inotify_add_watch";
    char path[4096];
    snprintf(path, sizeof path, "%s/objects.lock", outdir);
    if ((obj_lock = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600)) < 0) return "open lock";
    if (flock(obj_lock, LOCK_SH) != 0) return "flock";
    struct sigevent sev = { .sigev_notify = SIGEV_NONE };
    if (timer_create(CLOCK_MONOTONIC, &sev, &obj_posix) != 0) return "timer_create";
    if (timer_settime(obj_posix, 0, &far, NULL) != 0) return "timer_settime";
    return NULL;
}

/* 0, or what no longer holds. */
__attribute__((unused)) static const char *objects_check(void) {
    if (objects_n <= 0) return NULL;
    struct epoll_event evs[2 * OBJECTS_MAX];
    int ready = epoll_wait(obj_epoll, evs, 2 * OBJECTS_MAX, 0);
    if (ready != objects_n) return "the epoll set's readiness";        /* the eventfds, no timer yet */
    for (int i = 0; i < objects_n; i++) {
        uint64_t count = 0;
        if (read(obj_event[i], &count, sizeof count) != sizeof count || count != (uint64_t)i + 1) return "an eventfd's count";
        struct itimerspec left;
        if (timerfd_gettime(obj_timer[i], &left) != 0 || left.it_value.tv_sec == 0 || left.it_interval.tv_sec != 3600)
            return "a timerfd's setting";
        char buf[17] = "";
        if (read(obj_pipe[i][0], buf, 16) != 16 || memcmp(buf, IN_FLIGHT, 16) != 0) return "a pipe's bytes";
        if (read(obj_pair[i][1], buf, 16) != 16 || memcmp(buf, IN_FLIGHT, 16) != 0) return "a socketpair's bytes";
    }
    struct itimerspec left;
    if (timer_gettime(obj_posix, &left) != 0 || left.it_value.tv_sec == 0) return "the POSIX timer";
    if (flock(obj_lock, LOCK_SH | LOCK_NB) != 0) return "the flock";
    sigset_t now;
    sigprocmask(SIG_BLOCK, NULL, &now);
    if (!sigismember(&now, SIGUSR2)) return "the signal mask";
    return NULL;
}
