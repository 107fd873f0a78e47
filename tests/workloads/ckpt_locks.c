/* File locks, which a restore must take again before the process runs: POSIX record locks
 * (a range, and from an offset to EOF), an OFD lock and a flock. After the move a child
 * process checks from outside that each still excludes it, and is held by this process.
 * Usage: ckpt_locks OUTDIR [write|read] [DATADIR]: "read" takes only shared locks (which the
 * same file can hold twice, as when source and destination see one file); DATADIR holds the
 * locked files (default OUTDIR). */
#include "ckpt_common.h"
#include <sys/file.h>
#include <sys/wait.h>

static int open_data(const char *dir, const char *name) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(path, O_RDWR | O_CREAT, 0644);
    if (fd < 0) { perror(path); exit(3); }
    return fd;
}

static int posix_lock(int fd, int cmd, short type, off_t start, off_t len) {
    struct flock fl = { .l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len };
    return fcntl(fd, cmd, &fl);
}

/* What another process sees: 0 if every lock is there, held by parent; else a bit per miss. */
static int check_from_child(const char *dir, pid_t parent, int write) {
    int bad = 0;
    int a = open_data(dir, "posix.dat"), b = open_data(dir, "ofd.dat"), c = open_data(dir, "flock.dat");
    struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 10, .l_len = 10 };
    if (fcntl(a, F_GETLK, &fl) || fl.l_type != (write ? F_WRLCK : F_RDLCK) || fl.l_pid != parent) bad |= 1;
    struct flock tail = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 1000, .l_len = 5 };
    if (fcntl(a, F_GETLK, &tail) || tail.l_type != F_RDLCK || tail.l_pid != parent || tail.l_start != 100) bad |= 2;
    struct flock gap = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 40, .l_len = 10 };
    if (fcntl(a, F_GETLK, &gap) || gap.l_type != F_UNLCK) bad |= 4;      /* nothing more than was held */
    struct flock ofd = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0 };
    if (fcntl(b, F_OFD_GETLK, &ofd) || ofd.l_type != (write ? F_WRLCK : F_RDLCK)) bad |= 8;
    if (flock(c, LOCK_EX | LOCK_NB) == 0 || errno != EWOULDBLOCK) bad |= 16;
    if (!write && flock(c, LOCK_SH | LOCK_NB) != 0) bad |= 32;
    return bad;
}

int main(int argc, char **argv) {
    init(argc, argv);
    int write = argc < 3 || strcmp(argv[2], "read") != 0;
    const char *dir = argc > 3 ? argv[3] : outdir;
    FILE *out = open_output();
    int a = open_data(dir, "posix.dat"), b = open_data(dir, "ofd.dat"), c = open_data(dir, "flock.dat");
    if (posix_lock(a, F_SETLK, write ? F_WRLCK : F_RDLCK, 10, 10)) { perror("F_SETLK"); return 3; }
    if (posix_lock(a, F_SETLK, F_RDLCK, 100, 0)) { perror("F_SETLK to EOF"); return 3; }
    if (posix_lock(b, F_OFD_SETLK, write ? F_WRLCK : F_RDLCK, 0, 0)) { perror("F_OFD_SETLK"); return 3; }
    if (flock(c, write ? LOCK_EX : LOCK_SH)) { perror("flock"); return 3; }
    ready();
    linger(50);
    pid_t me = getpid(), child = fork();
    if (child == 0) _exit(check_from_child(dir, me, write));
    int status = 0;
    waitpid(child, &status, 0);
    int bad = WIFEXITED(status) ? WEXITSTATUS(status) : 255;
    /* Still ours to release and take again, as before. */
    if (posix_lock(a, F_SETLK, F_UNLCK, 0, 0) || posix_lock(a, F_SETLK, F_WRLCK, 0, 0)) bad |= 64;
    fprintf(out, "locks checked: %s (%d)\n", bad ? "lost" : "all held", bad);
    verdict(!bad, "missing locks: %d", bad);
    return 0;
}
