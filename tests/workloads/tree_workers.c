/* A parent and three workers it forks: each worker talks to the parent over a socketpair of
 * its own and reports progress down one pipe they all share; they all write to one log file
 * through the description they inherited (one offset: no line overwrites another). The
 * parent reaps each worker with waitpid(pid) and checks its exit status and getppid(). Held
 * (WORKLOAD_HOLD), the whole tree waits at round 20, every worker alive and waiting for its
 * next task, until the test lets it go: it is moved whole however busy the machine. */
#include "ckpt_common.h"
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>

#define WORKERS 3

static int worker(int id, int sock, int progress, int log, pid_t parent) {
    unsigned long long acc = id + 1;
    for (int round = 0; round < 40 * scale; round++) {
        unsigned long long task;
        if (recv(sock, &task, sizeof task, MSG_WAITALL) != sizeof task) return 10;
        for (int k = 0; k < 20000; k++) acc = acc * 6364136223846793005ull + task + k;
        if (send(sock, &acc, sizeof acc, 0) != sizeof acc) return 11;
        char line[64];
        int n = snprintf(line, sizeof line, "worker %d round %d\n", id, round);
        if (write(progress, line, n) != n) return 12;
        dprintf(log, "w%d r%d\n", id, round);
        if (getppid() != parent) return 13;
        sleep_ms(5);
    }
    return 20 + id;
}

int main(int argc, char **argv) {
    init(argc, argv);
    FILE *out = open_output();
    if (chdir(outdir) != 0) return 3;
    int log = open("log", O_WRONLY | O_CREAT | O_TRUNC, 0644);      /* shared offset, no O_APPEND */
    int progress[2];
    if (pipe(progress)) return 3;
    pid_t pids[WORKERS];
    int socks[WORKERS];
    for (int i = 0; i < WORKERS; i++) {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) return 3;
        pid_t parent = getpid();
        pids[i] = fork();
        if (pids[i] == 0) {
            close(sv[0]);
            close(progress[0]);
            _exit(worker(i, sv[1], progress[1], log, parent));
        }
        close(sv[1]);
        socks[i] = sv[0];
    }
    close(progress[1]);
    char buf[4096];
    size_t lines = 0;
    unsigned long long sum = 0;
    for (int round = 0; round < 40 * scale; round++) {
        for (int i = 0; i < WORKERS; i++) {
            unsigned long long task = round * 1000 + i;
            if (send(socks[i], &task, sizeof task, 0) != sizeof task) return 4;
        }
        for (int i = 0; i < WORKERS; i++) {
            unsigned long long acc;
            if (recv(socks[i], &acc, sizeof acc, MSG_WAITALL) != sizeof acc) return 5;
            sum ^= acc;
        }
        if (round == 5) ready();
        if (round == 20) hold_on();
        ssize_t n = read(progress[0], buf, sizeof buf);      /* some lines may wait in the pipe */
        for (ssize_t k = 0; k < n; k++) lines += buf[k] == '\n';
    }
    char why[256] = "";
    for (int i = 0; i < WORKERS; i++) {
        int status;
        if (waitpid(pids[i], &status, 0) != pids[i]) strcat(why, "waitpid; ");
        else if (!WIFEXITED(status) || WEXITSTATUS(status) != 20 + i) strcat(why, "worker status; ");
    }
    ssize_t n;
    while ((n = read(progress[0], buf, sizeof buf)) > 0)
        for (ssize_t k = 0; k < n; k++) lines += buf[k] == '\n';
    if (lines != (size_t)WORKERS * 40 * scale) strcat(why, "progress lines; ");
    off_t end = lseek(log, 0, SEEK_CUR);
    struct stat st;
    if (fstat(log, &st) || st.st_size != end) strcat(why, "log offset; ");
    fprintf(out, "sum %016llx lines %zu\n", sum, lines);
    verdict(!why[0], "%s", why);
    return 0;
}
