/* Sockets with classic BPF filters (SO_ATTACH_FILTER), the kind tcpdump-like code and DNS
 * servers attach: a UDP socket bound on loopback whose filter keeps datagrams of at most 4
 * bytes, locked (SO_LOCK_FILTER); the receiving end of a unix datagram socketpair with the
 * same filter, not locked; a UDP socket never bound with a longer filter. Before and after the
 * move it reads each filter back (SO_GET_FILTER); after, the programs must be the same
 * instructions, the lock still in force (detaching fails with EPERM) and absent where there
 * was none, and datagrams sent to both filtered sockets arrive only where short enough.
 * Usage: ckpt_filters OUTDIR */
#include "ckpt_common.h"
#include <arpa/inet.h>
#include <linux/filter.h>
#include <netinet/in.h>
#include <sys/socket.h>

/* Keep what is at most 4 bytes of payload: the packet a filter sees starts at the UDP header
 * (8 bytes) on a UDP socket, at the message itself on a unix one. */
#define KEEP_SHORT(header) { \
    { BPF_LD | BPF_W | BPF_LEN, 0, 0, 0 },                 \
    { BPF_JMP | BPF_JGT | BPF_K, 1, 0, (header) + 4 },      \
    { BPF_RET | BPF_K, 0, 0, 0xffff },                      \
    { BPF_RET | BPF_K, 0, 0, 0 },                           \
}

static struct sock_filter udp_prog[] = KEEP_SHORT(8);
static struct sock_filter unix_prog[] = KEEP_SHORT(0);
/* Never run (nothing reaches an unbound socket): only read back. */
static struct sock_filter long_prog[] = {
    { BPF_LD | BPF_H | BPF_ABS, 0, 0, 12 }, { BPF_JMP | BPF_JEQ | BPF_K, 0, 4, 0x0800 },
    { BPF_LD | BPF_W | BPF_ABS, 0, 0, 26 }, { BPF_JMP | BPF_JEQ | BPF_K, 1, 0, 0x7f000001 },
    { BPF_LD | BPF_W | BPF_ABS, 0, 0, 30 }, { BPF_JMP | BPF_JEQ | BPF_K, 0, 1, 0x7f000001 },
    { BPF_RET | BPF_K, 0, 0, 0xffff }, { BPF_RET | BPF_K, 0, 0, 0 },
};

static int attach(int fd, struct sock_filter *prog, unsigned short len) {
    struct sock_fprog p = { .len = len, .filter = prog };
    return setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, &p, sizeof p);
}

/* The filter read back: its length in instructions (-1: unreadable), copied into ``into``. */
static int read_back(int fd, struct sock_filter *into, int room) {
    socklen_t len = room;
    if (getsockopt(fd, SOL_SOCKET, SO_GET_FILTER, room ? into : NULL, &len) != 0) return -1;
    return len;
}

static int locked(int fd) {
    int v = -1;
    socklen_t len = sizeof v;
    getsockopt(fd, SOL_SOCKET, SO_LOCK_FILTER, &v, &len);
    return v;
}

/* Of "ok" and "too long", what arrives at ``to`` (sent through ``from``), as a word. */
static const char *what_arrives(int from, int to, const struct sockaddr_in *at) {
    static char got[64];
    const char *sent[] = { "ok", "too long" };
    for (int i = 0; i < 2; i++) {
        if (at ? sendto(from, sent[i], strlen(sent[i]), 0, (const struct sockaddr *)at, sizeof *at) < 0
               : send(from, sent[i], strlen(sent[i]), 0) < 0) return "send failed";
    }
    /* Loopback delivers at once; a marker that passes the filter says the two before it were judged. */
    if (at ? sendto(from, "end", 3, 0, (const struct sockaddr *)at, sizeof *at) < 0 : send(from, "end", 3, 0) < 0)
        return "send failed";
    got[0] = 0;
    for (;;) {
        char buf[32];
        ssize_t n = recv(to, buf, sizeof buf - 1, 0);
        if (n < 0) return "recv failed";
        buf[n] = 0;
        if (!strcmp(buf, "end")) return got;
        strncat(got, buf, sizeof got - strlen(got) - 2);
        strcat(got, ";");
    }
}

int main(int argc, char **argv) {
    init(argc, argv);
    FILE *out = open_output();
    int udp = socket(AF_INET, SOCK_DGRAM, 0), sender = socket(AF_INET, SOCK_DGRAM, 0);
    int unbound = socket(AF_INET, SOCK_DGRAM, 0), plain = socket(AF_INET, SOCK_DGRAM, 0);
    int pair[2];
    if (udp < 0 || sender < 0 || unbound < 0 || plain < 0 || socketpair(AF_UNIX, SOCK_DGRAM, 0, pair)) return 3;
    struct sockaddr_in at = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t alen = sizeof at;
    if (bind(udp, (struct sockaddr *)&at, sizeof at) || getsockname(udp, (struct sockaddr *)&at, &alen)) return 3;
    int on = 1;
    if (attach(udp, udp_prog, 4) || setsockopt(udp, SOL_SOCKET, SO_LOCK_FILTER, &on, sizeof on)) return 3;
    if (attach(pair[1], unix_prog, 4) || attach(unbound, long_prog, 8)) return 3;
    struct sock_filter before[3][8];
    if (read_back(udp, before[0], 8) != 4 || read_back(pair[1], before[1], 8) != 4 ||
        read_back(unbound, before[2], 8) != 8) return 3;

    ready();
    linger(50);

    char why[1024] = "";
    struct sock_filter after[8];
    if (read_back(udp, after, 8) != 4 || memcmp(after, before[0], 4 * sizeof *after)) strcat(why, "udp filter; ");
    if (read_back(pair[1], after, 8) != 4 || memcmp(after, before[1], 4 * sizeof *after)) strcat(why, "unix filter; ");
    if (read_back(unbound, after, 8) != 8 || memcmp(after, before[2], 8 * sizeof *after)) strcat(why, "unbound filter; ");
    if (read_back(plain, NULL, 0) != 0 || read_back(pair[0], NULL, 0) != 0) strcat(why, "a filter where there was none; ");
    if (locked(udp) != 1 || locked(pair[1]) != 0) strcat(why, "SO_LOCK_FILTER; ");
    if (setsockopt(udp, SOL_SOCKET, SO_DETACH_FILTER, &on, sizeof on) != -1 || errno != EPERM)
        strcat(why, "the lock does not hold; ");
    const char *got = what_arrives(sender, udp, &at);
    if (strcmp(got, "ok;")) { strcat(why, "udp got "); strcat(why, got); strcat(why, "; "); }
    got = what_arrives(pair[0], pair[1], NULL);
    if (strcmp(got, "ok;")) { strcat(why, "unix got "); strcat(why, got); strcat(why, "; "); }

    fprintf(out, "filters checked: %s\n", why[0] ? why : "all good");
    verdict(!why[0], "%s", why);
    return 0;
}
