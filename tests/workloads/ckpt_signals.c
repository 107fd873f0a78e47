/* Signal state: a SIGUSR1 handler, SIGPIPE ignored, SIGUSR2 blocked and left pending, an
 * interval timer, an alternate signal stack, and every disposition as the kernel reports it
 * (/proc/self/status SigIgn, SigCgt: no signal ignored or handled that was not, 32 and 33
 * included). All must behave the same after restore. With WORKLOAD_MDWE set, the process
 * first denies itself memory that is writable and executable (PR_SET_MDWE; exit 77 where the
 * kernel lacks it), and checks it still does at the end. */
#include "ckpt_common.h"
#include <signal.h>
#include <sys/prctl.h>
#include <sys/time.h>

static volatile sig_atomic_t usr1, usr2, alarms, on_alt;
static char altstack[1 << 16];

static void on_usr1(int s) { (void)s; usr1++; int x; on_alt = (char *)&x >= altstack && (char *)&x < altstack + sizeof altstack; }
static void on_usr2(int s) { (void)s; usr2++; }
static void on_alrm(int s) { (void)s; alarms++; }

static void dispositions(char *buf, size_t size) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    buf[0] = 0;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "SigIgn:", 7) || !strncmp(line, "SigCgt:", 7)) strncat(buf, line, size - strlen(buf) - 1);
    if (f) fclose(f);
}

int main(int argc, char **argv) {
    init(argc, argv);
    if (getenv("WORKLOAD_MDWE") && prctl(65 /* PR_SET_MDWE */, 1 /* PR_MDWE_REFUSE_EXEC_GAIN */, 0, 0, 0)) {
        fprintf(stderr, "PR_SET_MDWE: %s\n", strerror(errno));
        return 77;
    }
    FILE *out = open_output();
    stack_t ss = { .ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = 0 };
    sigaltstack(&ss, NULL);
    struct sigaction sa = {0};
    sa.sa_handler = on_usr1; sa.sa_flags = SA_ONSTACK | SA_RESTART; sigaction(SIGUSR1, &sa, NULL);
    sa.sa_handler = on_usr2; sa.sa_flags = 0; sigaction(SIGUSR2, &sa, NULL);
    sa.sa_handler = on_alrm; sa.sa_flags = SA_RESTART; sigaction(SIGALRM, &sa, NULL);
    sa.sa_handler = on_usr2; sa.sa_flags = SA_RESTART; sigaction(SIGRTMIN + 5, &sa, NULL);
    sa.sa_handler = on_usr2; sa.sa_flags = SA_NODEFER; sigaction(SIGTRAP, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGTTOU, SIG_IGN);
    char disp_before[128], disp_after[128];
    dispositions(disp_before, sizeof disp_before);
    sigset_t block; sigemptyset(&block); sigaddset(&block, SIGUSR2);
    sigprocmask(SIG_BLOCK, &block, NULL);
    raise(SIGUSR2);                                   /* stays pending while blocked */
    struct itimerval it = { {0, 50000}, {0, 50000} };
    setitimer(ITIMER_REAL, &it, NULL);
    ready();
    linger(60);        /* the checkpoint lands in here */
    int fails = 0;
    char why[512] = "";
    dispositions(disp_after, sizeof disp_after);
    if (strcmp(disp_before, disp_after)) { fails++; fprintf(stderr, "before:\n%safter:\n%s", disp_before, disp_after); strcat(why, "dispositions differ (see stderr); "); }
    sigset_t pend; sigpending(&pend);
    if (!sigismember(&pend, SIGUSR2)) { fails++; strcat(why, "SIGUSR2 not pending; "); }
    if (usr2) { fails++; strcat(why, "SIGUSR2 delivered while blocked; "); }
    struct sigaction cur; sigaction(SIGPIPE, NULL, &cur);
    if (cur.sa_handler != SIG_IGN) { fails++; strcat(why, "SIGPIPE not ignored; "); }
    raise(SIGUSR1);
    if (usr1 != 1 || !on_alt) { fails++; strcat(why, "SIGUSR1 handler or altstack; "); }
    stack_t now; sigaltstack(NULL, &now);
    if (now.ss_sp != altstack || now.ss_size != sizeof altstack) { fails++; strcat(why, "sigaltstack; "); }
    int before = alarms;
    for (int i = 0; i < 30; i++) sleep_ms(10);
    if (alarms <= before) { fails++; strcat(why, "itimer stopped; "); }
    sigprocmask(SIG_UNBLOCK, &block, NULL);
    if (usr2 != 1) { fails++; strcat(why, "SIGUSR2 lost; "); }
    /* Set before the move, the denial of writable code must hold after it (it cannot be lifted). */
    if (getenv("WORKLOAD_MDWE") && prctl(66 /* PR_GET_MDWE */, 0, 0, 0, 0) != 1) { fails++; strcat(why, "PR_SET_MDWE lost; "); }
    fprintf(out, "usr1 %d usr2 %d ignpipe %d\n", (int)usr1, (int)usr2, cur.sa_handler == SIG_IGN);
    verdict(!fails, "%s", why);
    return 0;
}
