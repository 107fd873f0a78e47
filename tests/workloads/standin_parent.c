/* A parent that stays home: starts its child workload, waits for it and writes what its
 * wait() saw, one line per event, to OUTDIR/parent_log ("stopped S", "continued", "exited N",
 * "signaled S"); the child's pid goes to OUTDIR/child_pid. Ends when the child has ended.
 * With -p the child's stdout is a pipe the parent reads to its end (into OUTDIR/relayed)
 * before it waits, as a launcher or `$(...)` does.
 * Usage: standin_parent [-p] OUTDIR CHILD [ARGS...] */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static void put(const char *dir, const char *name, const char *text, const char *mode) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, mode);
    if (!f) { perror(path); exit(1); }
    fputs(text, f);
    fclose(f);
}

int main(int argc, char **argv) {
    int piped = argc > 1 && strcmp(argv[1], "-p") == 0;
    argv += piped;
    argc -= piped;
    if (argc < 3) { fprintf(stderr, "usage: standin_parent [-p] OUTDIR CHILD [ARGS...]\n"); return 2; }
    const char *dir = argv[1];
    int pfd[2] = {-1, -1};
    if (piped && pipe(pfd) < 0) { perror("pipe"); return 1; }
    pid_t child = fork();
    if (child < 0) { perror("fork"); return 1; }
    if (child == 0) {
        if (piped) { dup2(pfd[1], 1); close(pfd[0]); close(pfd[1]); }
        execv(argv[2], argv + 2);
        perror(argv[2]);
        _exit(127);
    }
    char line[64];
    snprintf(line, sizeof line, "%d\n", child);
    put(dir, "child_pid.tmp", line, "w");
    char from[4096], to[4096];
    snprintf(from, sizeof from, "%s/child_pid.tmp", dir);
    snprintf(to, sizeof to, "%s/child_pid", dir);
    rename(from, to);
    if (piped) {
        close(pfd[1]);
        char buf[4096];
        ssize_t n;
        snprintf(from, sizeof from, "%s/relayed", dir);
        FILE *f = fopen(from, "w");
        if (!f) { perror(from); return 1; }
        while ((n = read(pfd[0], buf, sizeof buf)) > 0) { fwrite(buf, 1, (size_t)n, f); fflush(f); }
        fclose(f);
        put(dir, "relay_eof", "\n", "w");
    }
    for (;;) {
        int st;
        pid_t got = waitpid(child, &st, WUNTRACED | WCONTINUED);
        if (got < 0) { perror("waitpid"); return 1; }
        if (WIFSTOPPED(st)) snprintf(line, sizeof line, "stopped %d\n", WSTOPSIG(st));
        else if (WIFCONTINUED(st)) snprintf(line, sizeof line, "continued\n");
        else if (WIFEXITED(st)) snprintf(line, sizeof line, "exited %d\n", WEXITSTATUS(st));
        else snprintf(line, sizeof line, "signaled %d%s\n", WTERMSIG(st), WCOREDUMP(st) ? " core" : "");
        put(dir, "parent_log", line, "a");
        if (WIFEXITED(st) || WIFSIGNALED(st)) {
            put(dir, "parent_done.tmp", line, "w");       /* whole when it appears */
            snprintf(from, sizeof from, "%s/parent_done.tmp", dir);
            snprintf(to, sizeof to, "%s/parent_done", dir);
            rename(from, to);
            return 0;
        }
    }
}
