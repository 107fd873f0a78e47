/* Runs under seccomp filters (no_new_privs set), in two threads: after a checkpoint and
 * restore or a move, each filter must still act in the threads it acted in.
 * Usage: ckpt_seccomp OUTDIR shared|own
 *   filter 1: getppid() fails with errno 42;
 *   filter 2 (SECCOMP_FILTER_FLAG_LOG): acct() kills the process (SIGSYS), the last call made;
 *   filter 3: prctl() fails with EPERM (the dump's and restore's injected prctls must pass it).
 * "shared": all three with TSYNC, so both threads share the chain of three; "own": filter 1
 * with TSYNC, then 2 and 3 in the main thread only (its chain of three, the other's of one).
 * "strict": one thread in strict mode (read, write, exit, sigreturn only), waiting in read()
 * on a pipe that its SIGUSR1 handler writes to; then it writes "strict mode holds" and makes
 * a call strict mode forbids: killed (SIGKILL). */
#include "ckpt_common.h"
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>

static int install(int nr, unsigned action, unsigned flags) {
    struct sock_filter prog[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, nr, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, action),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog fp = { sizeof prog / sizeof prog[0], prog };
    return syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &fp);
}

struct seen { long ppid; int ppid_errno; long prctl; int prctl_errno; int filters; int mode; };

static void look(struct seen *s) {
    char name[16];
    errno = 0;
    s->ppid = syscall(SYS_getppid);
    s->ppid_errno = errno;
    errno = 0;
    s->prctl = prctl(PR_GET_NAME, name);
    s->prctl_errno = errno;
    s->filters = s->mode = -1;
    /* Read without stdio: a malloc in the other thread would give it an arena of its own. */
    char text[4096];
    int fd = open("/proc/thread-self/status", O_RDONLY | O_CLOEXEC);
    ssize_t n = fd < 0 ? -1 : read(fd, text, sizeof text - 1);
    if (fd >= 0) close(fd);
    text[n > 0 ? n : 0] = 0;
    char *at = strstr(text, "\nSeccomp:");
    if (at) sscanf(at, "\nSeccomp: %d", &s->mode);
    at = strstr(text, "\nSeccomp_filters:");
    if (at) sscanf(at, "\nSeccomp_filters: %d", &s->filters);
}

static volatile int go;
static struct seen other_before, other_after;

static void *other(void *arg) {
    (void)arg;
    while (!go) sleep_ms(1);
    struct seen mine;
    look(&mine);
    int mode = mine.mode;
    mine.mode = -1;
    other_before = mine;                      /* mode last: ready once the rest is in */
    __atomic_store_n(&other_before.mode, mode, __ATOMIC_RELEASE);
    while (go < 2) sleep_ms(1);
    look(&other_after);
    return NULL;
}

static int wake[2];

static void on_usr1(int sig) {
    (void)sig;
    char c = 1;
    if (write(wake[1], &c, 1) != 1) _exit(3);
}

static int strict(void) {
    FILE *out = open_output();
    struct rlimit nocore = { 0, 0 };
    setrlimit(RLIMIT_CORE, &nocore);
    if (pipe(wake) != 0) return 3;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
    int fd = fileno(out);
    static const char line[] = "strict mode holds\n";
    ready();
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT) != 0) return 4;
    char c;
    if (read(wake[0], &c, 1) == 1)            /* woken by SIGUSR1, after the move */
        if (write(fd, line, sizeof line - 1) < 0) _exit(5);
    syscall(SYS_getpid);                      /* strict mode kills it here */
    syscall(SYS_exit, 6);                     /* not reached */
    return 6;
}

int main(int argc, char **argv) {
    init(argc, argv);
    if (argc > 2 && strcmp(argv[2], "strict") == 0) return strict();
    int own = argc > 2 && strcmp(argv[2], "own") == 0;
    struct rlimit nocore = { 0, 0 };
    setrlimit(RLIMIT_CORE, &nocore);          /* the SIGSYS at the end dumps no core */
    FILE *out = open_output();
    pthread_t t;
    other_before.mode = -1;                   /* the other thread sets it once it has looked */
    pthread_create(&t, NULL, other, NULL);
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    if (install(SYS_getppid, SECCOMP_RET_ERRNO | 42, SECCOMP_FILTER_FLAG_TSYNC) != 0 ||
        install(SYS_acct, SECCOMP_RET_KILL_PROCESS, SECCOMP_FILTER_FLAG_LOG | (own ? 0 : SECCOMP_FILTER_FLAG_TSYNC)) != 0 ||
        install(SYS_prctl, SECCOMP_RET_ERRNO | EPERM, own ? 0 : SECCOMP_FILTER_FLAG_TSYNC) != 0) {
        perror("seccomp");
        verdict(0, "could not install the filters: %s", strerror(errno));
        return 1;
    }
    struct seen before, after;
    look(&before);
    go = 1;
    while (__atomic_load_n(&other_before.mode, __ATOMIC_ACQUIRE) < 0) sleep_ms(1);
    ready();
    linger(80);
    look(&after);
    go = 2;
    pthread_join(t, NULL);
    fprintf(out, "main: getppid %ld errno %d, prctl %ld errno %d, mode %d, filters %d\n", after.ppid,
            after.ppid_errno, after.prctl, after.prctl_errno, after.mode, after.filters);
    fprintf(out, "other: getppid %ld errno %d, prctl %ld errno %d, mode %d, filters %d\n", other_after.ppid,
            other_after.ppid_errno, other_after.prctl, other_after.prctl_errno, other_after.mode,
            other_after.filters);
    int ok = memcmp(&before, &after, sizeof before) == 0 && memcmp(&other_before, &other_after, sizeof before) == 0
             && after.ppid == -1 && after.ppid_errno == 42 && after.prctl_errno == EPERM;
    verdict(ok, "the filters act otherwise than before");
    fclose(out);
    syscall(SYS_acct, NULL);                  /* filter 2: killed here (SIGSYS) */
    return 0;
}
