/* A test shim for LD_PRELOAD: the C library's syscall() with io_submit(2) refused (EAGAIN,
 * nothing started) whenever the first control block of the call has one of the opcodes
 * listed in BX_REFUSE_AIO_OPCODES (decimal, comma-separated: 0 PREAD, 1 PWRITE, 3 FDSYNC).
 * Every refusal appends its opcode's digit to the file BX_REFUSE_AIO_LOG, if set.  The
 * server calls io_submit through ctypes and syscall(), so this is how a test makes the
 * kernel's refusal happen on a kernel that never refuses.  Every other call goes through. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef long (*syscall_fn)(long, ...);

static int refused(unsigned opcode)
{
    const char *list = getenv("BX_REFUSE_AIO_OPCODES");
    char *end;
    if (!list)
        return 0;
    while (*list) {
        unsigned long v = strtoul(list, &end, 10);
        if (end == list)
            return 0;
        if (v == opcode)
            return 1;
        list = *end == ',' ? end + 1 : end;
    }
    return 0;
}

static void note(unsigned opcode)
{
    const char *path = getenv("BX_REFUSE_AIO_LOG");
    char c = (char)('0' + opcode % 10);
    int fd;
    if (!path)
        return;
    fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (fd >= 0) {
        if (write(fd, &c, 1) != 1) { /* nothing to do: the test counts what arrived */ }
        close(fd);
    }
}

long syscall(long nr, ...)
{
    static syscall_fn real;
    long a[6];
    va_list ap;
    va_start(ap, nr);
    for (int i = 0; i < 6; i++)
        a[i] = va_arg(ap, long);
    va_end(ap);
    if (!real)
        real = (syscall_fn)dlsym(RTLD_NEXT, "syscall");
    if (nr == SYS_io_submit && a[1] > 0 && a[2]) {
        struct iocb **cbs = (struct iocb **)a[2];
        unsigned opcode = cbs[0]->aio_lio_opcode;
        if (refused(opcode)) {
            note(opcode);
            errno = EAGAIN;
            return -1;
        }
    }
    return real(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
}
