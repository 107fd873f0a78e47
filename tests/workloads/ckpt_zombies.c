/* A parent with four children that have ended and that it has not reaped yet (zombies): two
 * exited (status 0 and 3), two killed by a signal (SIGKILL, SIGTERM). After the move it reaps
 * each by its pid and writes how each ended: a zombie must come back as the same zombie, its
 * end (exit status, or the signal) what the parent's wait() says. */
#include "ckpt_common.h"
#include <signal.h>
#include <sys/wait.h>

int main(int argc, char **argv) {
    init(argc, argv);
    FILE *out = open_output();
    int how[4] = { 0, 3, -SIGKILL, -SIGTERM };
    pid_t kids[4];
    for (int i = 0; i < 4; i++) {
        kids[i] = fork();
        if (kids[i] < 0) return 3;
        if (kids[i] == 0) {
            if (how[i] >= 0) _exit(how[i]);
            kill(getpid(), -how[i]);
            _exit(13);
        }
    }
    for (int i = 0; i < 4; i++) {           /* each a zombie before the move, none reaped */
        siginfo_t si;
        if (waitid(P_PID, kids[i], &si, WEXITED | WNOWAIT)) { perror("waitid"); return 3; }
    }
    ready();
    linger(50);
    int ok = 1;
    for (int i = 0; i < 4; i++) {
        int status;
        if (waitpid(kids[i], &status, 0) != kids[i]) { perror("waitpid"); return 3; }
        if (how[i] >= 0) {
            fprintf(out, "child %d: exited %d\n", i, WIFEXITED(status) ? WEXITSTATUS(status) : -1);
            ok &= WIFEXITED(status) && WEXITSTATUS(status) == how[i];
        } else {
            fprintf(out, "child %d: killed by %d\n", i, WIFSIGNALED(status) ? WTERMSIG(status) : -1);
            ok &= WIFSIGNALED(status) && WTERMSIG(status) == -how[i];
        }
    }
    verdict(ok, "%s", ok ? "" : "a child ended otherwise than it had");
    return 0;
}
