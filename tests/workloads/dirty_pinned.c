/* Memory pinned for DMA (io_uring fixed buffers): writes into it bypass write-protection, so
 * the page-table trackers must refuse this process. Usage: dirty_pinned OUTDIR */
#include "ckpt_common.h"
#include <linux/io_uring.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>

int main(int argc, char **argv) {
    init(argc, argv);
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    int ring = (int)syscall(__NR_io_uring_setup, 4, &p);
    if (ring < 0) { perror("io_uring_setup"); return 3; }
    size_t len = 1 << 20;
    char *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(buf, 1, len);
    struct iovec iov = { buf, len };
    if (syscall(__NR_io_uring_register, ring, IORING_REGISTER_BUFFERS, &iov, 1) < 0) {
        perror("io_uring_register"); return 3;
    }
    ready();
    for (;;) pause();
}
