/* A parent that starts one short command after another with vfork(), as make and shells do
 * (posix_spawn): each child shares the parent's memory for a moment (here 20 ms, a slow
 * exec) before it execs. Usage: vfork_loop OUT READY N [GO]. READY once 4 ran; at the end OUT
 * says how many of the N ran and exited 0. With GO (a path) it goes on past N until GO
 * exists, so that a slow move never finds it ended, and counts those too. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 4 && argc != 5) return 2;
    int n = atoi(argv[3]), ran = 0;
    const char *go = argc == 5 ? argv[4] : NULL;
    for (int i = 0; i < n || (go && access(go, F_OK) != 0); i++) {
        pid_t child = vfork();
        if (child == 0) {
            usleep(20000);
            execl("/bin/true", "true", (char *)0);
            _exit(127);
        }
        int status = 0;
        if (child < 0 || waitpid(child, &status, 0) != child) return 3;
        if (WIFEXITED(status) && WEXITSTATUS(status) == 0) ran++;
        if (i >= n) n = i + 1;
        if (i == 3) {
            FILE *ready = fopen(argv[2], "w");
            if (ready) fclose(ready);
        }
    }
    FILE *out = fopen(argv[1], "w");
    if (!out) return 4;
    fprintf(out, "%d of %d ran\n", ran, n);
    return fclose(out) != 0;
}
