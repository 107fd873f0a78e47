/* A parent and its child count in host-local shared memory: SysV segments (one IPC_PRIVATE,
 * one with a key, one marked IPC_RMID while attached, and the keyed one attached again
 * read-only by the child, the first one's attachment split by mprotect) and a file in /dev/shm (the parent keeps its fd, the child only
 * maps it). Each process adds ROUNDS to every counter before "ready" and ROUNDS
 * after "go" (made by the test after the move); then the parent reports what it sees: the
 * counters, that each id still names its segment (a fresh shmat reads the same counter, the
 * key finds the same id), owner, permissions, attach counts, the removed mark, the read-only
 * attachment's protection, the file's mode, size and contents through its fd.
 * argv: DIR KEY NAME (the file is /dev/shm/NAME) */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define ROUNDS 1000
#define SIZE 8192

static char dir[4096];

static void path(char *buf, const char *name) { snprintf(buf, 4200, "%s/%s", dir, name); }

static void touch(const char *name) {
    char p[4200], tmp[4300];
    path(p, name);
    snprintf(tmp, sizeof tmp, "%s.tmp", p);
    FILE *f = fopen(tmp, "w");
    if (f) fclose(f);
    rename(tmp, p);
}

static void wait_for(const char *name) {
    char p[4200];
    path(p, name);
    while (access(p, F_OK) != 0) usleep(5000);
}

static void count(long *counters[], int n, long *done) {
    for (int i = 0; i < ROUNDS; i++) {
        for (int k = 0; k < n; k++) __atomic_fetch_add(counters[k], 1, __ATOMIC_SEQ_CST);
        if (i % 100 == 0) usleep(1000);
    }
    __atomic_fetch_add(done, 1, __ATOMIC_SEQ_CST);
}

static void wait_done(long *done, long want) {
    while (__atomic_load_n(done, __ATOMIC_SEQ_CST) < want) usleep(1000);
}

static int run(FILE *out, key_t key, const char *name) {
    int ids[3];
    ids[0] = shmget(IPC_PRIVATE, SIZE, IPC_CREAT | 0600);
    ids[1] = shmget(key, 5000, IPC_CREAT | IPC_EXCL | 0640);
    ids[2] = shmget(IPC_PRIVATE, SIZE, IPC_CREAT | 0600);
    if (ids[0] < 0 || ids[1] < 0 || ids[2] < 0) { perror("shmget"); return 1; }
    long *c[4];
    for (int k = 0; k < 3; k++) {
        c[k] = shmat(ids[k], NULL, 0);
        if (c[k] == (void *)-1) { perror("shmat"); return 1; }
    }
    if (shmctl(ids[2], IPC_RMID, NULL) != 0) { perror("IPC_RMID"); return 1; }
    char *second = (char *)c[0] + 4096;     /* the first segment's attachment, split in two */
    if (mprotect(second, 4096, PROT_READ) != 0) { perror("mprotect"); return 1; }
    int fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR, 0640);
    if (fd < 0 || ftruncate(fd, SIZE) != 0) { perror("shm_open"); return 1; }
    c[3] = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (c[3] == MAP_FAILED) { perror("mmap"); return 1; }
    long *done = c[0] + 8;
    pid_t child = fork();
    long *ro = NULL;
    if (child == 0) {
        close(fd);      /* the child only maps the file */
        ro = shmat(ids[1], NULL, SHM_RDONLY);
        if (ro == (void *)-1) _exit(3);
    }
    count(c, 4, done);
    long mine = 0, *running = c[0] + 16;
    int kept = 1;
    if (child) { wait_done(done, 2); touch("ready"); }
    if (child) {
        /* Until "go" the parent writes on, through the move: a live migration onto a host that
         * sees the very segment must not write older pages over what the source writes. */
        char go[4200];
        path(go, "go");
        while (access(go, F_OK) != 0) {
            if (*running != mine) kept = 0;
            *running = ++mine;
            usleep(2000);
        }
    }
    wait_for("go");
    count(c, 4, done);
    if (child == 0) {
        /* The read-only attachment: still read-only (not even by mprotect), and the same memory. */
        int ok = mprotect(ro, 4096, PROT_READ | PROT_WRITE) != 0 && errno == EACCES;
        wait_done(done, 4);
        c[1][2] = ok && ro[0] == c[1][0] ? 1 : 2;
        _exit(shmdt(ro) == 0 ? 0 : 4);
    }
    int status;
    waitpid(child, &status, 0);
    fprintf(out, "child exit %d ro-attachment %ld writes kept %d\n", WEXITSTATUS(status), c[1][2], kept);
    for (int k = 0; k < 3; k++) {
        struct shmid_ds ds;
        long *again = shmat(ids[k], NULL, SHM_RDONLY);
        int st = shmctl(ids[k], IPC_STAT, &ds);
        fprintf(out, "segment %d: counter %ld, same through its id %d, stat %d size %zu mode %o uid %d gid %d "
                "nattch %lu key %s\n", k, c[k][0], again != (void *)-1 && again[0] == c[k][0], st,
                ds.shm_segsz, ds.shm_perm.mode & 01777, ds.shm_perm.uid, ds.shm_perm.gid,
                (unsigned long)ds.shm_nattch, ds.shm_perm.__key == key ? "its own" : ds.shm_perm.__key == 0 ? "0" : "other");
        if (again != (void *)-1) shmdt(again);
    }
    fprintf(out, "key finds the same id: %d\n", shmget(key, 0, 0) == ids[1]);
    int writable = mprotect(second, 4096, PROT_READ | PROT_WRITE) == 0;
    second[0] = 7;
    int whole = shmdt(c[0]) == 0 && mprotect(second, 4096, PROT_READ) != 0 && errno == ENOMEM;
    fprintf(out, "split attachment: writable again %d, detached whole %d\n", writable, whole);
    fprintf(out, "detach: %d\n", shmdt(c[2]) == 0);
    shmctl(ids[0], IPC_RMID, NULL);
    shmctl(ids[1], IPC_RMID, NULL);
    struct stat st, byname;
    long through_fd = 0;
    fstat(fd, &st);
    pread(fd, &through_fd, sizeof through_fd, 0);
    char p[300];
    snprintf(p, sizeof p, "/dev/shm%s", name);   /* name: "/NAME" */
    int same = stat(p, &byname) == 0 && byname.st_ino == st.st_ino;
    fprintf(out, "file: counter %ld through fd %ld mode %o size %ld by name %d\n", c[3][0], through_fd,
            st.st_mode & 07777, (long)st.st_size, same);
    shm_unlink(name);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    snprintf(dir, sizeof dir, "%s", argv[1]);
    char p[4200];
    path(p, "output");
    FILE *out = fopen(p, "w");
    if (!out) return 2;
    int rc = run(out, (key_t)strtol(argv[2], NULL, 0), argv[3]);
    fclose(out);
    if (rc == 0) {
        char tmp[4300];
        path(p, "verdict");
        snprintf(tmp, sizeof tmp, "%s.tmp", p);
        FILE *v = fopen(tmp, "w");
        if (v) { fputs("PASS\n", v); fclose(v); rename(tmp, p); }
    }
    return rc;
}
