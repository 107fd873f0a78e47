/* Unix sockets inside the process: socketpairs of each type with messages queued both ways,
 * one shut down for writing, one whose peer has closed, one never connected, and options
 * (buffer size, peek offset, receive timeout) and O_NONBLOCK per end. */
#include "ckpt_common.h"
#include <signal.h>
#include <sys/socket.h>
#include <sys/time.h>

static int expect(int fd, const char *want, size_t n) {
    char buf[256];
    ssize_t got = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
    return got == (ssize_t)n && memcmp(buf, want, n) == 0;
}

int main(int argc, char **argv) {
    init(argc, argv);
    FILE *out = open_output();
    signal(SIGPIPE, SIG_IGN);
    int st[2], dg[2], sp[2], half[2], gone[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, st) || socketpair(AF_UNIX, SOCK_DGRAM, 0, dg) ||
        socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK, 0, sp) || socketpair(AF_UNIX, SOCK_STREAM, 0, half) ||
        socketpair(AF_UNIX, SOCK_STREAM, 0, gone)) return 3;
    int lone = socket(AF_UNIX, SOCK_DGRAM, 0);
    send(st[0], "to-one ", 7, 0); send(st[0], "more", 4, 0);
    send(st[1], "to-zero", 7, 0);
    send(dg[0], "first", 5, 0); send(dg[0], "", 0, 0); send(dg[0], "third", 5, 0);
    send(dg[1], "back", 4, 0);
    send(sp[1], "packet one", 10, 0); send(sp[1], "packet two", 10, 0);
    send(half[0], "last words", 10, 0);
    shutdown(half[0], SHUT_WR);
    send(gone[1], "orphan", 6, 0);
    close(gone[1]);
    int rcvbuf = 100000;
    setsockopt(st[1], SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    socklen_t len = sizeof rcvbuf;
    getsockopt(st[1], SOL_SOCKET, SO_RCVBUF, &rcvbuf, &len);
    int peek = 2;
    setsockopt(dg[0], SOL_SOCKET, SO_PEEK_OFF, &peek, sizeof peek);
    struct timeval tv = { 3, 500000 };
    setsockopt(st[0], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);

    ready();
    linger(50);

    char why[1024] = "";
    char buf[64];
    if (!expect(st[1], "to-one more", 11)) strcat(why, "stream queue; ");
    if (!expect(st[0], "to-zero", 7)) strcat(why, "stream queue back; ");
    if (!expect(dg[1], "first", 5) || !expect(dg[1], "", 0) || !expect(dg[1], "third", 5)) strcat(why, "datagrams; ");
    if (recv(dg[0], buf, sizeof buf, MSG_DONTWAIT | MSG_PEEK) != 2 || memcmp(buf, "ck", 2)) strcat(why, "peek offset; ");
    if (!expect(dg[0], "back", 4)) strcat(why, "datagram back; ");
    if (!expect(sp[0], "packet one", 10) || !expect(sp[0], "packet two", 10)) strcat(why, "seqpacket; ");
    if (recv(sp[0], buf, sizeof buf, 0) != -1 || errno != EAGAIN) strcat(why, "seqpacket non-blocking; ");
    if (!expect(half[1], "last words", 10) || recv(half[1], buf, sizeof buf, 0) != 0) strcat(why, "shutdown peer; ");
    if (send(half[0], "x", 1, 0) != -1 || errno != EPIPE) strcat(why, "shut for writing; ");
    if (send(half[1], "reply", 5, 0) != 5 || !expect(half[0], "reply", 5)) strcat(why, "half-open reply; ");
    if (!expect(gone[0], "orphan", 6) || recv(gone[0], buf, sizeof buf, 0) != 0) strcat(why, "closed peer; ");
    int now = 0;
    len = sizeof now;
    getsockopt(st[1], SOL_SOCKET, SO_RCVBUF, &now, &len);
    if (now != rcvbuf) strcat(why, "receive buffer; ");
    struct timeval tv2 = { 0, 0 };
    len = sizeof tv2;
    getsockopt(st[0], SOL_SOCKET, SO_RCVTIMEO, &tv2, &len);
    if (tv2.tv_sec != 3 || tv2.tv_usec < 490000 || tv2.tv_usec > 510000) strcat(why, "receive timeout; ");
    int type = 0;
    len = sizeof type;
    if (getsockopt(lone, SOL_SOCKET, SO_TYPE, &type, &len) || type != SOCK_DGRAM) strcat(why, "unconnected socket; ");
    if (send(lone, "x", 1, 0) != -1 || errno != ENOTCONN) strcat(why, "unconnected socket sends; ");
    /* Still connected to each other. */
    if (send(st[0], "ping", 4, 0) != 4 || !expect(st[1], "ping", 4)) strcat(why, "stream pair; ");
    if (send(dg[1], "pong", 4, 0) != 4 || !expect(dg[0], "pong", 4)) strcat(why, "datagram pair; ");
    if (!(fcntl(st[0], F_GETFD) & FD_CLOEXEC) || (fcntl(dg[0], F_GETFD) & FD_CLOEXEC)) strcat(why, "close-on-exec; ");

    fprintf(out, "sockets checked: %s\n", why[0] ? why : "all good");
    verdict(!why[0], "%s", why);
    return 0;
}
