/* The child a parent waits for, moved while its parent stays (the home stand-in's tests).
 * Touches MIB MiB, writes "start" to OUTDIR/output and makes OUTDIR/ready; then waits for
 * OUTDIR/finish (its contents: the exit status to end with) or a signal. SIGUSR1 and SIGHUP
 * are counted and written; SIGTERM writes "got SIGTERM" and exits 3. At the end it writes
 * the checksum of its memory (the same as unmoved) and "bye". With WORKLOAD_NO_VDSO=1 it
 * first unmaps its vDSO (as a process under valgrind has none; it calls nothing that needs it).
 * Usage: standin_child OUTDIR MIB */
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t term, usr1, hup;
static int out;

static void unmap_vdso(void) {
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512];
    unsigned long start, end;
    while (f && fgets(line, sizeof line, f))
        if ((strstr(line, "[vdso]") || strstr(line, "[vvar")) && sscanf(line, "%lx-%lx", &start, &end) == 2 &&
            munmap((void *)start, end - start) != 0)
            _exit(102);
    if (f) fclose(f);
}

static void on_term(int sig) { (void)sig; term = 1; }
static void on_usr1(int sig) { (void)sig; usr1++; }
static void on_hup(int sig) { (void)sig; hup++; }

/* Each line goes to OUTDIR/output and to stdout (a pipe to the parent, for --relay). */
static void say(const char *text) {
    if (write(out, text, strlen(text)) < 0) _exit(100);
    if (write(1, text, strlen(text)) < 0) _exit(101);
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: standin_child OUTDIR MIB\n"); return 2; }
    const char *no_vdso = getenv("WORKLOAD_NO_VDSO");
    if (no_vdso && *no_vdso == '1') unmap_vdso();
    const char *dir = argv[1];
    size_t size = (size_t)atoi(argv[2]) << 20;
    char path[4096];
    snprintf(path, sizeof path, "%s/output", dir);
    out = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (out < 0) { perror(path); return 1; }
    unsigned char *mem = malloc(size);
    for (size_t i = 0; i < size; i++) mem[i] = (unsigned char)(i * 7 + 3);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term; sigaction(SIGTERM, &sa, 0);
    sa.sa_handler = on_usr1; sigaction(SIGUSR1, &sa, 0);
    sa.sa_handler = on_hup; sigaction(SIGHUP, &sa, 0);
    say("start\n");
    snprintf(path, sizeof path, "%s/ready", dir);
    close(open(path, O_WRONLY | O_CREAT, 0644));
    snprintf(path, sizeof path, "%s/finish", dir);
    int seen_usr1 = 0, seen_hup = 0, code = -1;
    while (!term && code < 0) {
        char line[64];
        while (seen_usr1 < usr1) { seen_usr1++; snprintf(line, sizeof line, "usr1 %d\n", seen_usr1); say(line); }
        while (seen_hup < hup) { seen_hup++; snprintf(line, sizeof line, "hup %d\n", seen_hup); say(line); }
        FILE *f = fopen(path, "r");
        if (f) {
            if (fscanf(f, "%d", &code) != 1) code = -1;
            fclose(f);
        }
        struct timespec ts = {0, 5 * 1000 * 1000};
        nanosleep(&ts, 0);
    }
    uint64_t sum = 0;
    for (size_t i = 0; i < size; i++) sum = sum * 31 + mem[i];
    char line[64];
    snprintf(line, sizeof line, "sum %llu\n", (unsigned long long)sum);
    say(line);
    if (term) { say("got SIGTERM\n"); return 3; }
    say("bye\n");
    return code;
}
