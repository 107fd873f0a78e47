/* A server on a named unix socket, its clients its own children (usage: unix_server OUTDIR NAME
 * [early]; NAME is a path, or @name for an abstract one).
 *
 * The server listens on NAME (non-blocking, backlog 4) and has a datagram socket bound to
 * NAME + "d". Two workers connect and exchange numbered messages with it (the server answers
 * r*r + the worker's id), and in rounds 1 to 4 send a datagram from a socket of their own bound
 * to NAME + "c<id>" (worker 1's connected to the server's), which the server leaves queued until the workers are done. Once both are
 * accepted, a third child connects and waits in the accept queue, unaccepted until the workers
 * are done (with "early", it sends 5 bytes first). At round 30 the server waits for OUTDIR/go
 * (the test makes it once the job has moved: the move comes mid-conversation). Then the server accepts one more client from outside (the test, after the move),
 * reads a line from it and answers "served <total>". Every socket's getsockname/getpeername,
 * the accepted connections' SO_PEERCRED (the waiter's too, accepted only after the move), the
 * listener's O_NONBLOCK and the datagrams' sender names are checked; output and verdict
 * as ckpt_common.h says. */
#include "ckpt_common.h"
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>

static const char *name;
static int early;            /* the waiting client sends "early" before it is accepted */
static char why[1024];

static void fail(const char *what) {
    if (strlen(why) + strlen(what) + 3 < sizeof why) { strcat(why, what); strcat(why, "; "); }
}

static socklen_t addr(const char *suffix, struct sockaddr_un *a) {
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    int abstract = name[0] == '@';
    snprintf(a->sun_path + abstract, sizeof a->sun_path - abstract, "%s%s", name + abstract, suffix);
    return offsetof(struct sockaddr_un, sun_path) + abstract + strlen(a->sun_path + abstract) + !abstract;
}

/* Whether an address the kernel gave names NAME + suffix. */
static int is(const struct sockaddr_un *got, socklen_t len, const char *suffix) {
    struct sockaddr_un want;
    socklen_t wlen = addr(suffix, &want);
    if (name[0] == '@') return len == wlen && memcmp(got->sun_path, want.sun_path, wlen - offsetof(struct sockaddr_un, sun_path)) == 0;
    return len > offsetof(struct sockaddr_un, sun_path) && strcmp(got->sun_path, want.sun_path) == 0;
}

static int peer_is(int fd, const char *suffix) {
    struct sockaddr_un a;
    socklen_t len = sizeof a;
    return getpeername(fd, (struct sockaddr *)&a, &len) == 0 && is(&a, len, suffix);
}

static int name_is(int fd, const char *suffix) {
    struct sockaddr_un a;
    socklen_t len = sizeof a;
    return getsockname(fd, (struct sockaddr *)&a, &len) == 0 && is(&a, len, suffix);
}

/* Whether SO_PEERCRED on an accepted connection names its client's process (same ids as ours). */
static int cred_is(int fd, pid_t pid) {
    struct ucred c;
    socklen_t len = sizeof c;
    return getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &c, &len) == 0 && c.pid == pid && c.uid == geteuid()
           && c.gid == getegid();
}

static int rounds(void) { return 60 * scale; }

/* A child's or the server's failure, said on stderr (the test shows it). */
static int died(const char *who, int code) {
    fprintf(stderr, "%s: failure %d (%s)\n", who, code, strerror(errno));
    return code;
}

/* Mid-conversation, the server waits for OUTDIR/go (the test makes it once the job has moved). */
static void wait_for_go(void) {
    char path[4096];
    snprintf(path, sizeof path, "%s/go", outdir);
    while (access(path, F_OK) != 0) sleep_ms(5);
}

static int connected(void) {
    struct sockaddr_un a;
    socklen_t len = addr("", &a);
    int c = socket(AF_UNIX, SOCK_STREAM, 0);
    if (c < 0 || connect(c, (struct sockaddr *)&a, len) != 0) _exit(9);
    return c;
}

static int worker(uint32_t id) {
    int c = connected();
    struct sockaddr_un own, server;
    socklen_t olen = addr(id ? "c1" : "c0", &own), slen = addr("d", &server);
    int d = socket(AF_UNIX, SOCK_DGRAM, 0);
    if (d < 0 || bind(d, (struct sockaddr *)&own, olen) != 0) return died("worker", 10);
    if (id == 1 && connect(d, (struct sockaddr *)&server, slen) != 0) return died("worker", 10);   /* one way, to the server */
    if (send(c, &id, sizeof id, 0) != sizeof id) return died("worker", 11);
    for (uint32_t r = 0; r < (uint32_t)rounds(); r++) {
        uint32_t reply;
        if (send(c, &r, sizeof r, 0) != sizeof r) return died("worker", 12);
        if (recv(c, &reply, sizeof reply, MSG_WAITALL) != sizeof reply) return died("worker", 13);
        if (reply != r * r + id) return died("worker", 14);
        if (r >= 1 && r <= 4) {
            char msg[32];
            int n = snprintf(msg, sizeof msg, "w%u r%u", id, r);
            if ((id == 1 ? send(d, msg, n, 0) : sendto(d, msg, n, 0, (struct sockaddr *)&server, slen)) != n) return died("worker", 15);
        }
        sleep_ms(20);
    }
    if (!peer_is(c, "") || !name_is(d, id ? "c1" : "c0") || (id == 1 && !peer_is(d, "d"))) return died("worker", 16);
    return 20 + id;
}

static int waiter(void) {
    int c = connected();
    char buf[8];
    if (early && send(c, "early", 5, 0) != 5) return died("waiter", 17);
    if (recv(c, buf, 2, MSG_WAITALL) != 2 || memcmp(buf, "go", 2) != 0) return died("waiter", 17);
    if (!peer_is(c, "")) return died("waiter", 18);
    if (send(c, "waited", 6, 0) != 6) return died("waiter", 19);
    return 22;
}

int main(int argc, char **argv) {
    init(argc, argv);
    if (argc < 3) return 2;
    name = argv[2];
    early = argc > 3 && strcmp(argv[3], "early") == 0;
    FILE *out = open_output();
    struct sockaddr_un a;
    socklen_t len = addr("", &a);
    if (name[0] != '@') unlink(a.sun_path);
    int l = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (l < 0 || bind(l, (struct sockaddr *)&a, len) != 0 || listen(l, 4) != 0) return died("server", 3);
    len = addr("d", &a);
    if (name[0] != '@') unlink(a.sun_path);
    int d = socket(AF_UNIX, SOCK_DGRAM, 0);
    if (d < 0 || bind(d, (struct sockaddr *)&a, len) != 0) return died("server", 3);
    for (int i = 0; i < 2 && name[0] != '@'; i++) { addr(i ? "c1" : "c0", &a); unlink(a.sun_path); }
    pid_t pids[3];
    int conns[2];
    uint32_t ids[2], done[2] = {0, 0}, total = 0;
    for (uint32_t i = 0; i < 2; i++) {
        if ((pids[i] = fork()) == 0) _exit(worker(i));
        struct pollfd p = { l, POLLIN, 0 };
        poll(&p, 1, 10000);
        if ((conns[i] = accept(l, NULL, NULL)) < 0) return died("server", 4);
        if (recv(conns[i], &ids[i], sizeof ids[i], MSG_WAITALL) != sizeof ids[i] || ids[i] > 1) return died("server", 4);
    }
    if ((pids[2] = fork()) == 0) _exit(waiter());
    int is_ready = 0;
    unsigned dgrams[2] = {0, 0};
    while (done[0] < (uint32_t)rounds() || done[1] < (uint32_t)rounds()) {
        uint32_t least = done[0] < done[1] ? done[0] : done[1];
        /* A worker done has closed its end: its connection is not read any more. */
        struct pollfd p[3] = { { done[0] < (uint32_t)rounds() ? conns[0] : -1, POLLIN, 0 },
                               { done[1] < (uint32_t)rounds() ? conns[1] : -1, POLLIN, 0 },
                               { l, is_ready ? 0 : POLLIN, 0 } };
        if (poll(p, 3, 10000) <= 0) return died("server", 5);
        for (int i = 0; i < 2; i++) {
            if (!(p[i].revents & POLLIN)) continue;
            uint32_t r;
            if (recv(conns[i], &r, sizeof r, MSG_WAITALL) != sizeof r) return died("server", 6);
            if (r == 30) wait_for_go();
            uint32_t reply = r * r + ids[i];
            if (send(conns[i], &reply, sizeof reply, 0) != sizeof reply) return died("server", 6);
            total += r;
            done[i] = r + 1;
        }
        if (!is_ready && least >= 6 && (p[2].revents & POLLIN)) {   /* the waiter is in the accept queue */
            ready();
            is_ready = 1;
        }
    }
    char msg[32];
    struct sockaddr_un from;
    socklen_t flen = sizeof from;
    ssize_t got;
    while ((got = recvfrom(d, msg, sizeof msg - 1, MSG_DONTWAIT, (struct sockaddr *)&from, &flen)) > 0) {
        unsigned w = msg[1] - '0';
        if (w > 1 || !is(&from, flen, w ? "c1" : "c0")) fail("a datagram's sender name");
        else dgrams[w]++;
        flen = sizeof from;
    }
    for (int i = 0; i < 2; i++) {
        fprintf(out, "worker %u: %u rounds, %u datagrams\n", ids[i], done[i], dgrams[ids[i]]);
        if (!name_is(conns[i], "")) fail("an accepted socket's name");
    }
    if (!name_is(l, "") || !name_is(d, "d")) fail("the listener's or datagram socket's name");
    if (!(fcntl(l, F_GETFL) & O_NONBLOCK)) fail("the listener lost O_NONBLOCK");
    struct pollfd p = { l, POLLIN, 0 };
    poll(&p, 1, 10000);
    int w = accept(l, NULL, NULL);
    char buf[64] = "";
    if (early) {
        if (w < 0 || recv(w, buf, 5, MSG_WAITALL) != 5 || memcmp(buf, "early", 5) != 0) fail("the waiter's early bytes");
        else fprintf(out, "waiter sent before it was accepted: %.5s\n", buf);
    }
    if (w < 0 || send(w, "go", 2, 0) != 2 || recv(w, buf, 6, MSG_WAITALL) != 6) fail("the waiter");
    for (int i = 0; i < 3; i++)
        if (!cred_is(i < 2 ? conns[i] : w, pids[i])) fail(i < 2 ? "a worker's SO_PEERCRED" : "the waiter's SO_PEERCRED");
    fprintf(out, "waiter: %.6s\n", buf);
    int status;
    for (int i = 0; i < 3; i++)
        if (waitpid(pids[i], &status, 0) != pids[i] || !WIFEXITED(status) || WEXITSTATUS(status) != 20 + i) {
            snprintf(buf, sizeof buf, "child %d exited %d", i, WIFEXITED(status) ? WEXITSTATUS(status) : -1);
            fail(buf);
        }
    /* One more client, from outside: the test, after the move. */
    write_file("serving", "serving\n");
    poll(&p, 1, 60000);
    int late = accept(l, NULL, NULL);
    ssize_t n = late < 0 ? -1 : recv(late, buf, sizeof buf - 1, 0);
    if (n <= 0) fail("the late client");
    else {
        buf[n] = 0;
        fprintf(out, "late client: %s\n", buf);
        dprintf(late, "served %u", total);
    }
    fprintf(out, "total %u\n", total);
    verdict(why[0] == 0, "%s", why);
    return 0;
}
