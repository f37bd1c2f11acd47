/* A tiny FUSE file system for tests: it shows the files of a backing directory, and every
 * fsync/fdatasync fails with EIO while a file named "FAIL_FSYNC" exists in that directory
 * (a disk losing writes under the page cache, without root or device mapper); every read
 * and write fails with EIO while a file named "FAIL_IO" exists there (a failing disk).
 *
 *   failfsync_fuse BACKING_DIR MOUNTPOINT [FUSE options]   (returns once mounted)
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 31
#include <fuse.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <dirent.h>

static char backing[PATH_MAX];

static void real_path(char *out, const char *path)
{
    if (snprintf(out, PATH_MAX, "%s%s", backing, path) >= PATH_MAX) {
        out[0] = 0;
    }
}

static int fs_getattr(const char *path, struct stat *st, struct fuse_file_info *fi)
{
    char p[PATH_MAX];
    (void)fi;
    real_path(p, path);
    return lstat(p, st) == -1 ? -errno : 0;
}

static int fs_readdir(const char *path, void *buf, fuse_fill_dir_t filler, off_t off,
                      struct fuse_file_info *fi, enum fuse_readdir_flags flags)
{
    char p[PATH_MAX];
    DIR *d;
    struct dirent *e;
    (void)off; (void)fi; (void)flags;
    real_path(p, path);
    d = opendir(p);
    if (!d) {
        return -errno;
    }
    while ((e = readdir(d))) {
        filler(buf, e->d_name, NULL, 0, 0);
    }
    closedir(d);
    return 0;
}

static int fs_open(const char *path, struct fuse_file_info *fi)
{
    char p[PATH_MAX];
    int fd;
    real_path(p, path);
    fd = open(p, fi->flags & ~(O_DIRECT | O_CREAT | O_EXCL));
    if (fd == -1) {
        return -errno;
    }
    fi->fh = fd;
    return 0;
}

static int failing_io(void)
{
    char p[PATH_MAX];
    real_path(p, "/FAIL_IO");
    return access(p, F_OK) == 0;
}

static int fs_read(const char *path, char *buf, size_t size, off_t off,
                   struct fuse_file_info *fi)
{
    ssize_t n;
    (void)path;
    if (failing_io()) {
        return -EIO;
    }
    n = pread(fi->fh, buf, size, off);
    return n == -1 ? -errno : (int)n;
}

static int fs_write(const char *path, const char *buf, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
    ssize_t n;
    (void)path;
    if (failing_io()) {
        return -EIO;
    }
    n = pwrite(fi->fh, buf, size, off);
    return n == -1 ? -errno : (int)n;
}

static int fs_fsync(const char *path, int datasync, struct fuse_file_info *fi)
{
    char p[PATH_MAX];
    (void)path;
    real_path(p, "/FAIL_FSYNC");
    if (access(p, F_OK) == 0) {
        return -EIO;
    }
    return (datasync ? fdatasync(fi->fh) : fsync(fi->fh)) == -1 ? -errno : 0;
}

static int fs_release(const char *path, struct fuse_file_info *fi)
{
    (void)path;
    close(fi->fh);
    return 0;
}

static int fs_flush(const char *path, struct fuse_file_info *fi)
{
    (void)path; (void)fi;
    return 0;
}

static const struct fuse_operations ops = {
    .getattr = fs_getattr,
    .readdir = fs_readdir,
    .open = fs_open,
    .read = fs_read,
    .write = fs_write,
    .fsync = fs_fsync,
    .flush = fs_flush,
    .release = fs_release,
};

int main(int argc, char **argv)
{
    if (argc < 3 || !realpath(argv[1], backing)) {
        fprintf(stderr, "usage: %s BACKING_DIR MOUNTPOINT [FUSE options]\n", argv[0]);
        return 2;
    }
    argv[1] = argv[0];
    return fuse_main(argc - 1, argv + 1, &ops, NULL);
}
