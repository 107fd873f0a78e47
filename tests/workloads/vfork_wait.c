/* A parent in vfork(), its child sharing its memory until it execs: the child waits for a
 * file before it does (a real child execs within microseconds; this one stays there until
 * the test lets it go). Usage: vfork_wait READY GO. The parent prints the child's status. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    pid_t child = vfork();
    if (child == 0) {
        FILE *ready = fopen(argv[1], "w");      /* (the parent cannot say it: it waits) */
        if (ready) fclose(ready);
        while (access(argv[2], F_OK) != 0) usleep(1000);
        execl("/bin/echo", "echo", "child ran", (char *)0);
        _exit(127);
    }
    int status = 0;
    if (child < 0 || waitpid(child, &status, 0) != child) return 3;
    printf("parent: child exited %d\n", WEXITSTATUS(status));
    return 0;
}
