/* An event loop's kernel objects: an epoll instance watching an eventfd (edge-triggered), a
 * periodic timerfd, a signalfd with a signal pending and a pipe end whose EPOLLONESHOT watch
 * has fired (so it is disabled); a second eventfd in semaphore mode; a CLOCK_REALTIME timerfd
 * armed at an absolute time an hour away that a clock change would cancel
 * (TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET, as daemons watch for clock steps). */
#include "ckpt_common.h"
#include <signal.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>

static int watch(int ep, int fd, uint32_t events, uint64_t data) {
    struct epoll_event ev = { .events = events, .data.u64 = data };
    return epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
}

static int ready_set(int ep, uint64_t *seen) {
    struct epoll_event evs[8];
    int n = epoll_wait(ep, evs, 8, 0);
    *seen = 0;
    for (int i = 0; i < n; i++) *seen |= 1ull << (evs[i].data.u64 - 100);
    return n;
}

int main(int argc, char **argv) {
    init(argc, argv);
    FILE *out = open_output();
    int e1 = eventfd(5, EFD_NONBLOCK), e2 = eventfd(3, EFD_NONBLOCK | EFD_SEMAPHORE);
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    struct itimerspec its = { { 0, 20000000 }, { 0, 20000000 } };
    timerfd_settime(tfd, 0, &its, NULL);
    int wall = timerfd_create(CLOCK_REALTIME, TFD_NONBLOCK | TFD_CLOEXEC);
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    struct itimerspec hour = { { 0, 0 }, { now.tv_sec + 3600, 0 } };
    if (timerfd_settime(wall, TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET, &hour, NULL)) return 3;
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    sigprocmask(SIG_BLOCK, &usr1, NULL);
    int sfd = signalfd(-1, &usr1, SFD_NONBLOCK);
    raise(SIGUSR1);
    int p[2];
    if (pipe(p) || write(p[1], "x", 1) != 1) return 3;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (watch(ep, e1, EPOLLIN | EPOLLET, 101) || watch(ep, tfd, EPOLLIN, 102) || watch(ep, sfd, EPOLLIN, 103) ||
        watch(ep, p[0], EPOLLIN | EPOLLONESHOT, 104)) return 3;
    uint64_t seen;
    ready_set(ep, &seen);                           /* fires the one-shot watch: now disabled */
    if (!(seen & (1 << 4))) return 3;
    ready();
    linger(50);

    char why[512] = "";
    sleep_ms(50);
    ready_set(ep, &seen);
    if (!(seen & (1 << 2))) strcat(why, "timerfd not ready; ");
    if (!(seen & (1 << 3))) strcat(why, "signalfd not ready; ");
    if (seen & (1 << 4)) strcat(why, "one-shot watch fired again; ");
    uint64_t v;
    if (read(e1, &v, 8) != 8 || v != 5) strcat(why, "eventfd count; ");
    for (int i = 0; i < 3; i++) if (read(e2, &v, 8) != 8 || v != 1) strcat(why, "semaphore read; ");
    if (read(e2, &v, 8) != -1 || errno != EAGAIN) strcat(why, "semaphore count; ");
    if (read(tfd, &v, 8) != 8 || v < 1) strcat(why, "timer ticks; ");
    /* Still absolute and cancellable: its fdinfo says so; and still an hour away, give or take. */
    char path[64], line[128];
    snprintf(path, sizeof path, "/proc/self/fdinfo/%d", wall);
    FILE *info = fopen(path, "r");
    int flags = -1;
    while (info && fgets(line, sizeof line, info)) sscanf(line, "settime flags: %o", &flags);
    if (info) fclose(info);
    if (flags != (TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET)) strcat(why, "absolute timerfd's flags; ");
    struct itimerspec left;
    if (timerfd_gettime(wall, &left) || left.it_value.tv_sec < 3000 || left.it_value.tv_sec > 3600)
        strcat(why, "absolute timerfd's time left; ");
    sleep_ms(50);
    if (read(tfd, &v, 8) != 8 || v < 1) strcat(why, "timer period; ");
    struct signalfd_siginfo si;
    if (read(sfd, &si, sizeof si) != sizeof si || si.ssi_signo != SIGUSR1) strcat(why, "signalfd read; ");
    struct epoll_event mod = { .events = EPOLLIN | EPOLLONESHOT, .data.u64 = 104 };
    if (epoll_ctl(ep, EPOLL_CTL_MOD, p[0], &mod)) strcat(why, "re-arm one-shot; ");
    ready_set(ep, &seen);
    if (!(seen & (1 << 4))) strcat(why, "re-armed watch silent; ");
    uint64_t one = 1;
    if (write(e1, &one, 8) != 8) strcat(why, "eventfd write; ");
    ready_set(ep, &seen);
    if (!(seen & (1 << 1))) strcat(why, "edge not reported; ");
    if (epoll_ctl(ep, EPOLL_CTL_DEL, tfd, NULL)) strcat(why, "remove a watch; ");
    fprintf(out, "events checked: %s\n", why[0] ? why : "all good");
    verdict(!why[0], "%s", why);
    return 0;
}
