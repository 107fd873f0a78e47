/* A FIFO (named pipe) the process holds both ends of, with bytes in flight across the freeze:
 * one read-write open, a non-blocking reader and a writer, the pipe resized. After the freeze
 * the bytes come out in order, each open keeps its access mode and flags, the FIFO is still at
 * its path with its permissions, and an open of that path reaches the same pipe. */
#include "ckpt_common.h"
#include <signal.h>
#include <sys/stat.h>

static const char inflight[] = "bytes in flight in a FIFO across the freeze";

int main(int argc, char **argv) {
    init(argc, argv);
    FILE *out = open_output();
    if (chdir(outdir) != 0) return 3;
    signal(SIGPIPE, SIG_IGN);
    unlink("fifo");
    if (mkfifo("fifo", 0600) != 0 || chmod("fifo", 0640) != 0) return 3;
    int rw = open("fifo", O_RDWR);                          /* a reader and a writer: nothing waits */
    int rd = open("fifo", O_RDONLY | O_NONBLOCK);
    int wr = open("fifo", O_WRONLY | O_CLOEXEC);
    if (rw < 0 || rd < 0 || wr < 0) return 3;
    int size = fcntl(rd, F_SETPIPE_SZ, 128 * 1024);
    if (size < 0) return 3;
    if (write(wr, inflight, sizeof inflight) != sizeof inflight) return 3;
    if (write(rw, "+rw", 3) != 3) return 3;

    ready();
    linger(50);

    char why[1024] = "";
    char buf[256];
    ssize_t n = read(rd, buf, sizeof buf);
    if (n != sizeof inflight + 3 || memcmp(buf, inflight, sizeof inflight) || memcmp(buf + sizeof inflight, "+rw", 3))
        strcat(why, "bytes in flight; ");
    if (read(rd, buf, 1) != -1 || errno != EAGAIN) strcat(why, "reader not non-blocking; ");
    if ((fcntl(rd, F_GETFL) & O_ACCMODE) != O_RDONLY) strcat(why, "reader mode; ");
    if ((fcntl(wr, F_GETFL) & (O_ACCMODE | O_NONBLOCK)) != O_WRONLY) strcat(why, "writer mode; ");
    if ((fcntl(rw, F_GETFL) & (O_ACCMODE | O_NONBLOCK)) != O_RDWR) strcat(why, "read-write mode; ");
    if (!(fcntl(wr, F_GETFD) & FD_CLOEXEC) || (fcntl(rd, F_GETFD) & FD_CLOEXEC)) strcat(why, "close-on-exec; ");
    if (fcntl(rd, F_GETPIPE_SZ) != size) strcat(why, "pipe size; ");
    /* One pipe behind every open: written through one, read through another. */
    if (write(rw, "a", 1) != 1 || read(rd, buf, 1) != 1 || buf[0] != 'a') strcat(why, "rw to reader; ");
    if (write(wr, "b", 1) != 1 || read(rw, buf, 1) != 1 || buf[0] != 'b') strcat(why, "writer to rw; ");
    /* The FIFO is still at its path, and opening it reaches the same pipe. */
    struct stat st;
    if (stat("fifo", &st) != 0 || !S_ISFIFO(st.st_mode) || (st.st_mode & 07777) != 0640) strcat(why, "the FIFO's path; ");
    int again = open("fifo", O_WRONLY | O_NONBLOCK);
    if (again < 0 || write(again, "again", 5) != 5) strcat(why, "open by path; ");
    else if (read(rd, buf, sizeof buf) != 5 || memcmp(buf, "again", 5)) strcat(why, "bytes through the path; ");
    int reader = open("fifo", O_RDONLY | O_NONBLOCK);
    if (reader < 0 || write(wr, "c", 1) != 1 || read(reader, buf, 1) != 1 || buf[0] != 'c')
        strcat(why, "a new reader by path; ");

    fprintf(out, "fifo checked: %s\n", why[0] ? why : "all good");
    verdict(!why[0], "%s", why);
    return 0;
}
