/* A thread with something of its own that threads share otherwise: thread_own MODE READY GO
 * MODE: creds (setresuid through the raw system call: this thread alone, as Samba's threads
 * switch ids), fs (unshare(CLONE_FS): a working directory and umask of its own, then chdir),
 * files (unshare(CLONE_FILES): an fd table of its own). Once the thread has it, the main
 * thread makes READY and waits for GO, then lets the thread end; kcr-migrate must refuse the
 * process: restored, the thread would take its process's. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static const char *mode;
static int done[2], release[2];

static void *own(void *arg) {
    (void)arg;
    char c = !strcmp(mode, "creds") ? syscall(SYS_setresuid, 65534, 65534, 0) != 0
           : !strcmp(mode, "fs") ? unshare(CLONE_FS) != 0 || chdir("/") != 0
           : unshare(CLONE_FILES) != 0;
    if (write(done[1], &c, 1) != 1 || read(release[0], &c, 1) != 1) return (void *)1;
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4) return 2;
    mode = argv[1];
    pthread_t t;
    char failed = 1;
    void *ended;
    if (pipe(done) || pipe(release) || pthread_create(&t, NULL, own, NULL)) return 3;
    if (read(done[0], &failed, 1) != 1 || failed) return 4;
    close(open(argv[2], O_WRONLY | O_CREAT, 0644));
    struct timespec tick = {0, 10 * 1000 * 1000};
    for (int i = 0; i < 6000 && access(argv[3], F_OK) != 0; i++) nanosleep(&tick, NULL);
    if (write(release[1], "x", 1) != 1 || pthread_join(t, &ended) || ended) return 5;
    return 0;
}
