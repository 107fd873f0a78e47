/* Shared by the checkpoint/restore workloads: readiness and verdict files (zdtm style).
 * Usage: prog OUTDIR [args]. The workload writes OUTDIR/ready when it may be frozen,
 * its deterministic output to OUTDIR/output, and OUTDIR/verdict ("PASS" or "FAIL: why"). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *outdir;
/* WORKLOAD_SCALE=N stretches the waiting phases N times (live migration needs longer). */
static int scale = 1;

static void write_file(const char *name, const char *text) {
    char path[4096], tmp[4096];
    snprintf(path, sizeof path, "%s/%s", outdir, name);
    snprintf(tmp, sizeof tmp, "%s/.%s.tmp", outdir, name);
    FILE *f = fopen(tmp, "w");
    if (!f) { perror(tmp); exit(3); }
    fputs(text, f);
    fclose(f);
    rename(tmp, path);
}

static void ready(void) { write_file("ready", "ready\n"); }

/* WORKLOAD_HOLD=PATH: before its verdict, wait until PATH exists. A job a test moves is
 * started so: however slow the machine, it does not end before the test has moved it and
 * asks for the verdict (tests/_workloads.py, ``Workload(hold=True)``). A job whose test is
 * gone (PATH's folder removed, or 10 minutes passed) waits no longer. ``held`` is one 10 ms
 * tick of that wait, for a job that keeps doing something meanwhile: 1 while still held. */
static int held(long *ticks) {
    const char *hold = getenv("WORKLOAD_HOLD");
    if (!hold || !*hold || access(hold, F_OK) == 0 || *ticks >= 60000) return 0;
    char folder[4096];
    snprintf(folder, sizeof folder, "%s", hold);
    char *slash = strrchr(folder, '/');
    if (slash) {
        *slash = 0;
        if (access(folder, F_OK) != 0) return 0;
    }
    struct timespec tick = { 0, 10000000L };
    nanosleep(&tick, NULL);
    ++*ticks;
    return 1;
}

static void hold_on(void) {
    long ticks = 0;
    while (held(&ticks)) {}
}

static void verdict(int ok, const char *fmt, ...) {
    hold_on();
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = snprintf(buf, sizeof buf, "%s", ok ? "PASS" : "FAIL: ");
    if (!ok) vsnprintf(buf + n, sizeof buf - n, fmt, ap);
    va_end(ap);
    strcat(buf, "\n");
    write_file("verdict", buf);
}

static FILE *open_output(void) {
    char path[4096];
    snprintf(path, sizeof path, "%s/output", outdir);
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) { perror(path); exit(3); }
    FILE *f = fdopen(fd, "a");
    setvbuf(f, NULL, _IOLBF, 0);
    return f;
}

__attribute__((unused)) static void sleep_ms(long ms) {
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
}

/* The phase a test checkpoints or moves the workload in: TICKS x 10 ms (x WORKLOAD_SCALE), and
 * then, if the test holds it, until the test lets it go: the checks that follow run after the
 * move, however slow the machine. */
__attribute__((unused)) static void linger(int ticks) {
    for (int i = 0; i < ticks * scale; i++) sleep_ms(10);
    hold_on();
}

static void init(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: %s OUTDIR\n", argv[0]); exit(2); }
    outdir = argv[1];
    const char *sc = getenv("WORKLOAD_SCALE");
    if (sc && atoi(sc) > 0) scale = atoi(sc);
}
