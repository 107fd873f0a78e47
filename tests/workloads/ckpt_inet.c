/* TCP and UDP sockets a server holds: an IPv4 listener on every address, an IPv6-only
 * listener with options set (keepalive, no delay, a receive buffer, a backlog of 3), a UDP
 * socket bound on every address with SO_BROADCAST, a second UDP socket connected to it, and a
 * TCP socket never bound with TCP_NODELAY; a connection accepted from the IPv4 listener (so
 * with its SO_REUSEADDR) with bytes queued, not read yet; a UDP socket bound to 127.0.0.10
 * (not the address the route would give it), connected, with SO_NO_CHECK and shut for
 * receiving; two datagrams queued on the bound UDP socket, one from the connected one, one
 * from a socket closed since. Before and after the move it reads their ports, peers and options; after, it
 * reads the queued bytes and answers, connects to both listeners over loopback, accepts, and
 * sends a datagram from each connected UDP socket to the bound one. Its ports go to
 * OUTDIR/ports ("tcp4 tcp6 udp") for the test to reach it from outside.
 * Usage: ckpt_inet OUTDIR */
#include "ckpt_common.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>

static int port_of(int fd) {
    struct sockaddr_in6 a;
    socklen_t len = sizeof a;
    if (getsockname(fd, (struct sockaddr *)&a, &len)) return -1;
    return ntohs(a.sin6_port);          /* sin_port sits at the same offset */
}

static int opt(int fd, int level, int name) {
    int v = -1;
    socklen_t len = sizeof v;
    getsockopt(fd, level, name, &v, &len);
    return v;
}

/* Everything the move must keep, as one line. */
static void describe(int fd, char *buf, size_t n) {
    struct sockaddr_storage peer;
    socklen_t plen = sizeof peer;
    int connected = getpeername(fd, (struct sockaddr *)&peer, &plen) == 0;
    snprintf(buf, n, "port %d peer %d domain %d type %d accept %d reuse %d keep %d bcast %d rcvbuf %d v6only %d "
             "nodelay %d nocheck %d",
             port_of(fd), connected ? ntohs(((struct sockaddr_in *)&peer)->sin_port) : -1,
             opt(fd, SOL_SOCKET, SO_DOMAIN), opt(fd, SOL_SOCKET, SO_TYPE), opt(fd, SOL_SOCKET, SO_ACCEPTCONN),
             opt(fd, SOL_SOCKET, SO_REUSEADDR), opt(fd, SOL_SOCKET, SO_KEEPALIVE), opt(fd, SOL_SOCKET, SO_BROADCAST),
             /* (a connection's buffers are the kernel's to tune) */
             connected && opt(fd, SOL_SOCKET, SO_TYPE) == SOCK_STREAM ? -1 : opt(fd, SOL_SOCKET, SO_RCVBUF),
             opt(fd, SOL_SOCKET, SO_DOMAIN) == AF_INET6 ? opt(fd, IPPROTO_IPV6, IPV6_V6ONLY) : -1,
             opt(fd, SOL_SOCKET, SO_TYPE) == SOCK_STREAM ? opt(fd, IPPROTO_TCP, TCP_NODELAY) : -1,
             opt(fd, SOL_SOCKET, SO_NO_CHECK));
}

/* A UDP socket shut for receiving polls readable with POLLRDHUP. */
static int shut_for_reading(int fd) {
    struct pollfd p = { .fd = fd, .events = POLLRDHUP };
    return poll(&p, 1, 0) == 1 && (p.revents & POLLRDHUP);
}

static int talk_tcp(int listener, int family) {
    int c = socket(family, SOCK_STREAM, 0);
    struct sockaddr_in a4 = { .sin_family = AF_INET, .sin_port = htons(port_of(listener)),
                              .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    struct sockaddr_in6 a6 = { .sin6_family = AF_INET6, .sin6_port = htons(port_of(listener)),
                               .sin6_addr = IN6ADDR_LOOPBACK_INIT };
    int ok = family == AF_INET ? connect(c, (struct sockaddr *)&a4, sizeof a4) == 0
                               : connect(c, (struct sockaddr *)&a6, sizeof a6) == 0;
    int s = ok ? accept(listener, NULL, NULL) : -1;
    char buf[8] = "";
    ok = s >= 0 && send(c, "ping", 4, 0) == 4 && recv(s, buf, sizeof buf, 0) == 4 && memcmp(buf, "ping", 4) == 0;
    close(c);
    if (s >= 0) close(s);
    return ok;
}

int main(int argc, char **argv) {
    init(argc, argv);
    FILE *out = open_output();
    signal(SIGPIPE, SIG_IGN);
    int one = 1, rcvbuf = 100000;
    int tcp4 = socket(AF_INET, SOCK_STREAM, 0), tcp6 = socket(AF_INET6, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int udp = socket(AF_INET, SOCK_DGRAM, 0), conn = socket(AF_INET, SOCK_DGRAM, 0);
    int fresh = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in any4 = { .sin_family = AF_INET };
    struct sockaddr_in6 any6 = { .sin6_family = AF_INET6, .sin6_addr = IN6ADDR_ANY_INIT };
    setsockopt(tcp4, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(tcp6, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    setsockopt(tcp6, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    setsockopt(tcp6, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(tcp6, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    setsockopt(udp, SOL_SOCKET, SO_BROADCAST, &one, sizeof one);
    setsockopt(fresh, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (bind(tcp4, (struct sockaddr *)&any4, sizeof any4) || listen(tcp4, 16) ||
        bind(tcp6, (struct sockaddr *)&any6, sizeof any6) || listen(tcp6, 3) ||
        bind(udp, (struct sockaddr *)&any4, sizeof any4)) { perror("bind"); return 3; }
    struct sockaddr_in to = { .sin_family = AF_INET, .sin_port = htons(port_of(udp)),
                              .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (connect(conn, (struct sockaddr *)&to, sizeof to)) { perror("connect"); return 3; }
    int clt = socket(AF_INET, SOCK_STREAM, 0), low = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in lo4 = { .sin_family = AF_INET, .sin_port = htons(port_of(tcp4)),
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    struct sockaddr_in ten = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f00000a) };   /* 127.0.0.10 */
    if (connect(clt, (struct sockaddr *)&lo4, sizeof lo4)) { perror("connect"); return 3; }
    int acc = accept(tcp4, NULL, NULL);
    setsockopt(low, SOL_SOCKET, SO_NO_CHECK, &one, sizeof one);
    if (acc < 0 || send(clt, "queued", 6, 0) != 6 || bind(low, (struct sockaddr *)&ten, sizeof ten) ||
        connect(low, (struct sockaddr *)&to, sizeof to) || shutdown(low, SHUT_RD)) { perror("setup"); return 3; }
    int gone = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in lo_any = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (bind(gone, (struct sockaddr *)&lo_any, sizeof lo_any) || send(conn, "queued-1", 8, 0) != 8 ||
        sendto(gone, "from-gone", 9, 0, (struct sockaddr *)&to, sizeof to) != 9) { perror("queue"); return 3; }
    int gone_port = port_of(gone);
    close(gone);
    int fds[] = { tcp4, tcp6, udp, conn, fresh, acc, clt, low };
    enum { N = sizeof fds / sizeof fds[0] };
    char before[N][256], after[256];
    for (int i = 0; i < N; i++) describe(fds[i], before[i], sizeof before[i]);
    char ports[64];
    snprintf(ports, sizeof ports, "%d %d %d\n", port_of(tcp4), port_of(tcp6), port_of(udp));
    write_file("ports", ports);
    ready();
    linger(150);
    int same = 1;
    for (int i = 0; i < N; i++) {
        describe(fds[i], after, sizeof after);
        if (strcmp(before[i], after) != 0) {
            fprintf(out, "socket %d changed: was %s, now %s\n", i, before[i], after);
            same = 0;
        }
    }
    char buf[16] = "";
    int tcp_ok = recv(acc, buf, sizeof buf, MSG_DONTWAIT) == 6 && memcmp(buf, "queued", 6) == 0 &&
                 send(acc, "reply", 5, 0) == 5 && recv(clt, buf, sizeof buf, 0) == 5 && memcmp(buf, "reply", 5) == 0;
    tcp_ok = tcp_ok && talk_tcp(tcp4, AF_INET) && talk_tcp(tcp6, AF_INET6);
    struct sockaddr_in from;
    socklen_t flen = sizeof from;
    int udp_ok = recvfrom(udp, buf, sizeof buf, MSG_DONTWAIT, (struct sockaddr *)&from, &flen) == 8 &&
                 memcmp(buf, "queued-1", 8) == 0 && ntohs(from.sin_port) == port_of(conn);
    flen = sizeof from;
    udp_ok = udp_ok && recvfrom(udp, buf, sizeof buf, MSG_DONTWAIT, (struct sockaddr *)&from, &flen) == 9 &&
             memcmp(buf, "from-gone", 9) == 0 && ntohs(from.sin_port) == gone_port &&
             from.sin_addr.s_addr == htonl(INADDR_LOOPBACK);
    flen = sizeof from;
    udp_ok = udp_ok && send(conn, "datagram", 8, 0) == 8 &&
                 recvfrom(udp, buf, sizeof buf, 0, (struct sockaddr *)&from, &flen) == 8 &&
                 memcmp(buf, "datagram", 8) == 0 && ntohs(from.sin_port) == port_of(conn);
    flen = sizeof from;
    udp_ok = udp_ok && send(low, "low", 3, 0) == 3 &&
             recvfrom(udp, buf, sizeof buf, 0, (struct sockaddr *)&from, &flen) == 3 &&
             from.sin_addr.s_addr == htonl(0x7f00000a) && ntohs(from.sin_port) == port_of(low) &&
             shut_for_reading(low);
    fprintf(out, "inet: options %s, tcp %s, udp %s\n", same ? "kept" : "CHANGED", tcp_ok ? "talks" : "FAILED",
            udp_ok ? "talks" : "FAILED");
    verdict(same && tcp_ok && udp_ok, "same=%d tcp=%d udp=%d", same, tcp_ok, udp_ok);
    return 0;
}
