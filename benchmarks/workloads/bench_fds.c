/* A job with many open files: N regular files (every other one read at an offset), its
 * directory, /dev/null, and four files mapped privately; then it waits to be restored.
 * Usage: bench_fds DIR N  (writes DIR/ready once everything is open). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 3 || chdir(argv[1]) != 0) return 2;
    int n = atoi(argv[2]);
    char name[64];
    for (int i = 0; i < n; i++) {
        snprintf(name, sizeof name, "f%03d", i);
        int fd = open(name, O_RDWR | O_CREAT, 0644);
        if (fd < 0 || write(fd, "0123456789abcdef", 16) != 16) return 3;
        if (i % 2) lseek(fd, 5, SEEK_SET);
    }
    if (open(".", O_RDONLY | O_DIRECTORY) < 0 || open("/dev/null", O_WRONLY) < 0) return 3;
    for (int i = 0; i < 4; i++) {
        snprintf(name, sizeof name, "f%03d", i);
        int fd = open(name, O_RDONLY);
        if (fd < 0 || mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, fd, 0) == MAP_FAILED) return 3;
        close(fd);
    }
    int ready = open("ready", O_WRONLY | O_CREAT, 0644);
    close(ready);
    for (;;) pause();
}
