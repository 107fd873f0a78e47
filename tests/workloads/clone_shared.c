/* Two processes (not threads) sharing what clone() lets them share: clone_shared MODE READY GO
 * MODE: files (CLONE_FILES: one fd table), fs (CLONE_FS: one working directory, root and
 * umask) or vm (CLONE_VM: one address space, on a stack of the parent's). The child writes its
 * pid to READY (the moment both may be looked at) and waits for GO; the parent waits for it.
 * kcr-migrate must refuse them: restored, each would get its own. */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static char stack[256 << 10];
static const char *ready, *go;

static int child(void *arg) {
    (void)arg;
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", ready);
    FILE *f = fopen(tmp, "w");
    if (!f) return 3;
    fprintf(f, "%d\n", (int)getpid());
    fclose(f);
    rename(tmp, ready);
    struct timespec tick = {0, 10 * 1000 * 1000};
    for (int i = 0; i < 6000 && access(go, F_OK) != 0; i++) nanosleep(&tick, NULL);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 4) return 2;
    ready = argv[2];
    go = argv[3];
    int flags = !strcmp(argv[1], "files") ? CLONE_FILES : !strcmp(argv[1], "fs") ? CLONE_FS
              : !strcmp(argv[1], "vm") ? CLONE_VM : -1;
    if (flags < 0) return 2;
    pid_t pid = clone(child, stack + sizeof stack, flags | SIGCHLD, NULL);
    int status;
    if (pid < 0 || waitpid(pid, &status, 0) != pid) return 3;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 4;
}
