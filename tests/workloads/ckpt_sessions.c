/* Sessions and process groups a job made, each of which a parents-first fork does not make
 * again: the root (a child subreaper) with
 *   A: a session leader whose child A1 leads a group of its own, with A2 in it (the child is
 *      forked after its parent's setsid: in the parent's new session);
 *   B: a session leader that forked B1 before its setsid (B1 keeps the root's session);
 *   C: a group leader that exited (reaped): its child C1 (reparented to the root) holds the
 *      group, with C1's child C2 exited and not reaped (a zombie of that group);
 *   D: a session leader that exited after forking D1 with CLONE_PARENT: D1 is the root's child
 *      in the session (and group) of a process that is gone.
 * After the move each process checks it is in the session and group, under the parent, it was
 * in (C1 also checks its zombie's group, then reaps it with its status); the root collects
 * every exit status by pid. Usage: ckpt_sessions OUTDIR */
#include "ckpt_common.h"
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>

static int built[2];

static void done_building(void) {
    char c = 'b';
    if (write(built[1], &c, 1) != 1) _exit(3);
}

/* Where this process is now, as it must be after the move. */
struct where { pid_t sid, pgid, ppid; };

static struct where here(void) { return (struct where){ getsid(0), getpgid(0), getppid() }; }

static int same(struct where w) {
    struct where now = here();
    return now.sid == w.sid && now.pgid == w.pgid && now.ppid == w.ppid;
}

/* A process that only waits for the move and checks itself. */
static int leaf(void) {
    struct where w = here();
    done_building();
    linger(50);
    return same(w) ? 0 : 1;
}

static int reaped(pid_t pid) {
    int status;
    return waitpid(pid, &status, 0) == pid && WIFEXITED(status) ? WEXITSTATUS(status) : 99;
}

int main(int argc, char **argv) {
    init(argc, argv);
    FILE *out = open_output();
    if (pipe(built) || prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) return 3;
    pid_t root = getpid();
    setsid();                 /* (a leader already where started so: EPERM) as a restore makes it */

    pid_t a = fork();
    if (a == 0) {
        setsid();
        pid_t a1 = fork();
        if (a1 == 0) {
            setpgid(0, 0);
            pid_t a2 = fork();
            if (a2 == 0) _exit(leaf());
            int mine = leaf();
            _exit(mine | reaped(a2));
        }
        int mine = leaf();
        _exit(mine | reaped(a1));
    }
    pid_t b = fork();
    if (b == 0) {
        pid_t b1 = fork();
        if (b1 == 0) _exit(leaf());
        /* (b1 exists before the setsid: it stays in the root's session) */
        setsid();
        int mine = leaf();
        _exit(mine | reaped(b1));
    }
    pid_t c = fork();
    if (c == 0) {
        setpgid(0, 0);
        pid_t c1 = fork();
        if (c1 == 0) {
            pid_t c2 = fork();
            if (c2 == 0) _exit(7);
            siginfo_t info;
            if (waitid(P_PID, c2, &info, WEXITED | WNOWAIT)) _exit(4);
            while (getppid() != root) sleep_ms(1);       /* C has exited: the root adopted us */
            pid_t group = getpgid(c2);
            int mine = leaf();
            int zombie_ok = getpgid(c2) == group && reaped(c2) == 7;
            _exit(mine | !zombie_ok);
        }
        _exit(0);
    }
    pid_t d = fork();
    if (d == 0) {
        setsid();
        long d1 = syscall(SYS_clone, CLONE_PARENT, 0, 0, 0, 0);
        if (d1 == 0) _exit(leaf());
        _exit(d1 > 0 ? 0 : 5);
    }
    if (reaped(c) != 0 || reaped(d) != 0) return 3;
    for (int i = 0; i < 7; i++) {           /* A, A1, A2, B, B1, C1, D1 */
        char ch;
        if (read(built[0], &ch, 1) != 1) return 3;
    }
    /* The root's own children now: A, B, C1 and D1 (adopted, or born so). */
    pid_t kids[8];
    int n = 0;
    char path[64], line[4096];
    snprintf(path, sizeof path, "/proc/%d/task/%d/children", root, root);
    FILE *f = fopen(path, "r");
    if (!f || !fgets(line, sizeof line, f)) return 3;
    fclose(f);
    for (char *tok = strtok(line, " \n"); tok && n < 8; tok = strtok(NULL, " \n")) kids[n++] = atoi(tok);
    if (n != 4) return 3;

    ready();
    linger(50);
    char why[1024] = "";
    if (getsid(0) != root || getpgid(0) != root) strcat(why, "the root's session; ");
    for (int i = 0; i < n; i++) {
        int status = reaped(kids[i]);
        if (status) {
            char one[64];
            snprintf(one, sizeof one, "child %d ended %d; ", i, status);
            strcat(why, one);
        }
    }
    fprintf(out, "sessions checked: %s\n", why[0] ? why : "all good");
    verdict(!why[0], "%s", why);
    return 0;
}
