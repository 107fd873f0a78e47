/* SO_PEERCRED across a tree, which named the restorer (root) after a move: the parent makes a
 * socketpair and listens on an abstract name; its child keeps one end of the pair and connects
 * to the listener twice, the parent accepting only the first before the move. After the move
 * each socket must still name the process at its other end (the pair: the parent, which made
 * it; the child's connection: the parent, which listened; the parent's accepted connection
 * and the one it accepts only now: the child, which connected), with the same uid and gid. */
#include "ckpt_common.h"
#include <stddef.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>

static int peer_is(int fd, pid_t pid, const char *what, char *why, size_t size) {
    struct ucred c;
    socklen_t len = sizeof c;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &c, &len)) {
        snprintf(why + strlen(why), size - strlen(why), "%s: %s; ", what, strerror(errno));
        return 0;
    }
    if (c.pid != pid || c.uid != geteuid() || c.gid != getegid()) {
        snprintf(why + strlen(why), size - strlen(why), "%s names pid %d uid %u gid %u, not pid %d uid %u gid %u; ",
                 what, c.pid, c.uid, c.gid, pid, geteuid(), getegid());
        return 0;
    }
    return 1;
}

int main(int argc, char **argv) {
    init(argc, argv);
    FILE *out = open_output();
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, pair)) { perror("socketpair"); return 3; }
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    int n = snprintf(a.sun_path + 1, sizeof a.sun_path - 1, "kcr-peercred-%d", getpid());
    socklen_t alen = offsetof(struct sockaddr_un, sun_path) + 1 + n;
    int l = socket(AF_UNIX, SOCK_STREAM, 0);
    if (l < 0 || bind(l, (struct sockaddr *)&a, alen) || listen(l, 4)) { perror("listen"); return 3; }
    pid_t parent = getpid();
    pid_t child = fork();
    if (child < 0) { perror("fork"); return 3; }
    if (child == 0) {
        close(pair[0]);
        close(l);
        int c = socket(AF_UNIX, SOCK_STREAM, 0);
        if (c < 0 || connect(c, (struct sockaddr *)&a, alen)) _exit(3);
        int w = socket(AF_UNIX, SOCK_STREAM, 0);       /* waits in the accept queue over the move */
        if (w < 0 || connect(w, (struct sockaddr *)&a, alen)) _exit(3);
        char go;
        if (write(pair[1], "r", 1) != 1 || read(pair[1], &go, 1) != 1) _exit(3);     /* moved by now */
        char why[512] = "";
        peer_is(pair[1], parent, "the child's end of the pair", why, sizeof why);
        peer_is(c, parent, "the child's connection", why, sizeof why);
        size_t len = strlen(why);
        if (write(pair[1], why, len + 1) != (ssize_t)len + 1) _exit(3);
        _exit(0);
    }
    close(pair[1]);
    int s = accept(l, NULL, NULL);
    char r;
    if (s < 0 || read(pair[0], &r, 1) != 1) { perror("accept"); return 3; }
    ready();
    linger(50);
    char why[1024] = "";
    peer_is(pair[0], getpid(), "the parent's end of the pair", why, sizeof why);
    peer_is(s, child, "the parent's accepted connection", why, sizeof why);
    int later = accept(l, NULL, NULL);
    if (later < 0) strcat(why, "no connection waits in the accept queue; ");
    else peer_is(later, child, "the connection the parent accepts after the move", why, sizeof why);
    char theirs[512] = "";
    if (write(pair[0], "g", 1) != 1 || read(pair[0], theirs, sizeof theirs - 1) <= 0) strcat(why, "the child is gone; ");
    strncat(why, theirs, sizeof why - strlen(why) - 1);
    int status;
    if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status)) strcat(why, "child failed; ");
    fprintf(out, "peer credentials checked: %s\n", why[0] ? why : "all good");
    verdict(!why[0], "%s", why);
    return 0;
}
