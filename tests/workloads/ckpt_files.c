/* Files and memory kinds: an O_APPEND log, a file read at an offset, a directory fd,
 * /dev/null, the cwd, a private file mapping written to, a MAP_SHARED file mapping,
 * shared anonymous memory, and a PROT_NONE guard. */
#include "ckpt_common.h"
#include <dirent.h>
#include <sys/mman.h>

int main(int argc, char **argv) {
    init(argc, argv);
    char path[4096];
    FILE *out = open_output();
    if (chdir(outdir) != 0) return 3;
    int data = open("data.bin", O_RDWR | O_CREAT | O_TRUNC, 0644);
    char page[4096];
    for (int i = 0; i < 8; i++) { memset(page, 'a' + i, sizeof page); if (write(data, page, sizeof page) != 4096) return 3; }
    int rd = open("data.bin", O_RDONLY);
    lseek(rd, 4096 * 3 + 17, SEEK_SET);
    int dir = open(".", O_RDONLY | O_DIRECTORY);
    int devnull = open("/dev/null", O_WRONLY);
    char *priv = mmap(NULL, 8 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE, data, 0);
    char *shared = mmap(NULL, 8 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED, data, 0);
    char *shanon = mmap(NULL, 4 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    char *guard = mmap(NULL, 3 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    mprotect(guard + 4096, 4096, PROT_NONE);
    priv[5] = 'P';                      /* a written private file page */
    shanon[4096 * 2 + 9] = 'S';
    guard[0] = 'G'; guard[8192] = 'H';
    snprintf(path, sizeof path, "log.txt");
    int logfd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    dprintf(logfd, "before\n");
    ready();
    linger(50);
    char why[512] = "";
    char c;
    if (read(rd, &c, 1) != 1 || c != 'd') strcat(why, "read offset; ");
    if (lseek(rd, 0, SEEK_CUR) != 4096 * 3 + 18) strcat(why, "offset after read; ");
    if (write(devnull, "x", 1) != 1) strcat(why, "/dev/null; ");
    shared[4096 * 6] = 'W';             /* must reach the file */
    msync(shared, 8 * 4096, MS_SYNC);
    char fromfile;
    if (pread(data, &fromfile, 1, 4096 * 6) != 1 || fromfile != 'W') strcat(why, "MAP_SHARED write lost; ");
    if (priv[5] != 'P' || priv[4096 * 7] != 'h') strcat(why, "private file mapping; ");
    if (shanon[4096 * 2 + 9] != 'S') strcat(why, "shared anonymous; ");
    if (guard[0] != 'G' || guard[8192] != 'H') strcat(why, "anonymous pages; ");
    if (dprintf(logfd, "after\n") <= 0) strcat(why, "append; ");
    DIR *d = fdopendir(dup(dir));
    int seen = 0;
    struct dirent *e;
    while (d && (e = readdir(d))) if (!strcmp(e->d_name, "data.bin")) seen = 1;
    if (!seen) strcat(why, "directory fd; ");
    char cwd[4096];
    if (!getcwd(cwd, sizeof cwd) || strcmp(cwd, outdir) != 0) strcat(why, "cwd; ");
    fprintf(out, "files checked: %s\n", why[0] ? why : "all good");
    verdict(!why[0], "%s", why);
    return 0;
}
