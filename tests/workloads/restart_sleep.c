/* A sleep the kernel continues with restart_syscall: restart_sleep OUTDIR glibc|register
 * The thread sleeps 60 s; stopped and continued meanwhile (SIGSTOP, SIGCONT: Slurm's suspend
 * and resume, a debugger, a migration that was called off), it goes on sleeping in
 * restart_syscall, which names no call (/proc/PID/syscall shows 219). "glibc" sleeps with
 * clock_nanosleep(), whose code loads the call's number just before its syscall instruction;
 * "register" with syscall(), which passes it in a register. OUTDIR/ready appears before the
 * sleep; when it ends, OUTDIR/output says how. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    const char *dir = argv[1];
    char path[4096];
    snprintf(path, sizeof path, "%s/ready", dir);
    close(open(path, O_WRONLY | O_CREAT, 0644));
    struct timespec req = { 60, 0 }, rem = { 0, 0 };
    int r, err;
    if (!strcmp(argv[2], "glibc")) {
        r = clock_nanosleep(CLOCK_MONOTONIC, 0, &req, &rem);
        err = r;
    } else {
        r = (int)syscall(SYS_clock_nanosleep, CLOCK_MONOTONIC, 0, &req, &rem);
        err = r ? errno : 0;
    }
    snprintf(path, sizeof path, "%s/output", dir);
    FILE *out = fopen(path, "w");
    if (!out) return 3;
    fprintf(out, "slept: %s\n", err ? strerror(err) : "whole");
    fclose(out);
    return 0;
}
