/* fsrecord.c - an LD_PRELOAD shim that records every file-system call that changes what
 * a power cut could leave on disk, for files under $FSRECORD_ROOT, into $FSRECORD_LOG.
 *
 * Why: kill -9 keeps the page cache, so it cannot show a write that was never fsynced
 * being lost; these machines have no device-mapper (dm-log-writes) either. Like ALICE and
 * LazyFS, this records the calls (open, write/pwrite/writev/pwritev with their bytes, ftruncate, fsync,
 * fdatasync, rename, unlink, mkdir, rmdir), each with its CLOCK_MONOTONIC time, and
 * tests/powerloss/replay.py rebuilds what the disk holds after a power cut at any point:
 * only what an fsync made durable (a file's bytes by fsync of the file, a name by fsync
 * of its folder).
 *
 * Ordering: one mutex is held across each recorded call and its record, so the log's
 * order is the order the calls took effect in. An fsync is recorded twice, when it
 * starts (the bytes it covers: those written before) and when it returns (only then are
 * they durable); the call itself runs outside the mutex, so fsyncs of different threads
 * overlap as they do without the shim.
 *
 * Record: u8 op, u8 pad[3], i32 fd, i64 time_ns, i64 offset, u32 len, u32 len2, then len
 * bytes (a path or data) and len2 bytes (a second path). Built by replay.py with cc.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

enum { OP_OPEN = 1, OP_WRITE, OP_TRUNC, OP_SYNC_START, OP_SYNC_DONE, OP_RENAME, OP_UNLINK,
       OP_MKDIR, OP_RMDIR, OP_CLOSE };

struct rec {
    uint8_t op, pad[3];
    int32_t fd;
    int64_t time_ns, offset;
    uint32_t len, len2;
};

#define MAX_FD 65536
static char tracked[MAX_FD];
static pthread_mutex_t lock = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;
static int log_fd = -1;
static char root[PATH_MAX];
static size_t root_len;

static int (*real_open)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_pwritev)(int, const struct iovec *, int, off_t);
static ssize_t (*real_pwritev2)(int, const struct iovec *, int, off_t, int);
static int (*real_ftruncate)(int, off_t);
static int (*real_ftruncate64)(int, off_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_rename)(const char *, const char *);
static int (*real_renameat)(int, const char *, int, const char *);
static int (*real_unlink)(const char *);
static int (*real_unlinkat)(int, const char *, int);
static int (*real_mkdir)(const char *, mode_t);
static int (*real_rmdir)(const char *);
static int (*real_close)(int);

__attribute__((constructor)) static void init(void) {
    real_open = dlsym(RTLD_NEXT, "open");
    real_openat = dlsym(RTLD_NEXT, "openat");
    real_write = dlsym(RTLD_NEXT, "write");
    real_pwrite = dlsym(RTLD_NEXT, "pwrite");
    real_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    real_writev = dlsym(RTLD_NEXT, "writev");
    real_pwritev = dlsym(RTLD_NEXT, "pwritev");
    real_pwritev2 = dlsym(RTLD_NEXT, "pwritev2");
    real_ftruncate = dlsym(RTLD_NEXT, "ftruncate");
    real_ftruncate64 = dlsym(RTLD_NEXT, "ftruncate64");
    real_fsync = dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    real_rename = dlsym(RTLD_NEXT, "rename");
    real_renameat = dlsym(RTLD_NEXT, "renameat");
    real_unlink = dlsym(RTLD_NEXT, "unlink");
    real_unlinkat = dlsym(RTLD_NEXT, "unlinkat");
    real_mkdir = dlsym(RTLD_NEXT, "mkdir");
    real_rmdir = dlsym(RTLD_NEXT, "rmdir");
    real_close = dlsym(RTLD_NEXT, "close");
    const char *r = getenv("FSRECORD_ROOT"), *l = getenv("FSRECORD_LOG");
    if (r == NULL || l == NULL)
        return;
    if (realpath(r, root) == NULL)
        return;
    root_len = strlen(root);
    log_fd = real_open(l, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void put(const void *data, size_t len) {
    const char *p = data;
    while (len > 0) {
        ssize_t n = real_write(log_fd, p, len);
        if (n <= 0) {
            if (n < 0 && errno == EINTR)
                continue;
            abort(); /* a record cut short would make the replay lie */
        }
        p += n;
        len -= (size_t)n;
    }
}

static void record(uint8_t op, int fd, int64_t offset, const void *a, size_t alen,
                   const void *b, size_t blen) {
    struct rec r = {op, {0, 0, 0}, fd, now_ns(), offset, (uint32_t)alen, (uint32_t)blen};
    int saved = errno;
    put(&r, sizeof r);
    if (alen)
        put(a, alen);
    if (blen)
        put(b, blen);
    errno = saved;
}

/* The absolute path of `path` (relative to dirfd), its folder resolved; 0 if outside root. */
static int resolve(int dirfd, const char *path, char out[PATH_MAX]) {
    char base[PATH_MAX], dir[PATH_MAX];
    if (log_fd < 0 || path == NULL)
        return 0;
    if (path[0] == '/') {
        snprintf(base, sizeof base, "%s", path);
    } else {
        char where[64];
        if (dirfd == AT_FDCWD) {
            if (getcwd(dir, sizeof dir) == NULL)
                return 0;
        } else {
            snprintf(where, sizeof where, "/proc/self/fd/%d", dirfd);
            ssize_t n = readlink(where, dir, sizeof dir - 1);
            if (n < 0)
                return 0;
            dir[n] = 0;
        }
        snprintf(base, sizeof base, "%s/%s", dir, path);
    }
    /* resolve the folder (it exists), keep the last name as it is */
    char *slash = strrchr(base, '/');
    const char *name = slash + 1;
    *slash = 0;
    if (realpath(base[0] ? base : "/", dir) == NULL)
        return 0;
    if (strlen(dir) + 1 + strlen(name) >= PATH_MAX)
        return 0;
    if (*name)
        snprintf(out, PATH_MAX, "%s/%s", dir, name);
    else
        snprintf(out, PATH_MAX, "%s", dir);
    if (strncmp(out, root, root_len) != 0 || (out[root_len] != 0 && out[root_len] != '/'))
        return 0;
    return 1;
}

static int opened(int fd, int dirfd, const char *path, int flags) {
    char abs[PATH_MAX];
    if (fd < 0 || fd >= MAX_FD)
        return fd;
    tracked[fd] = 0;
    if (!resolve(dirfd, path, abs))
        return fd;
    tracked[fd] = 1;
    record(OP_OPEN, fd, flags, abs, strlen(abs), NULL, 0);
    return fd;
}

static int is_tracked(int fd) { return log_fd >= 0 && fd >= 0 && fd < MAX_FD && tracked[fd]; }

int open(const char *path, int flags, ...) {
    mode_t mode = 0;
    if (flags & (O_CREAT | O_TMPFILE)) {
        va_list ap;
        va_start(ap, flags);
        mode = va_arg(ap, mode_t);
        va_end(ap);
    }
    pthread_mutex_lock(&lock);
    int fd = real_open(path, flags, mode);
    opened(fd, AT_FDCWD, path, flags);
    pthread_mutex_unlock(&lock);
    return fd;
}
int open64(const char *path, int flags, ...) __attribute__((alias("open")));

int openat(int dirfd, const char *path, int flags, ...) {
    mode_t mode = 0;
    if (flags & (O_CREAT | O_TMPFILE)) {
        va_list ap;
        va_start(ap, flags);
        mode = va_arg(ap, mode_t);
        va_end(ap);
    }
    pthread_mutex_lock(&lock);
    int fd = real_openat(dirfd, path, flags, mode);
    opened(fd, dirfd, path, flags);
    pthread_mutex_unlock(&lock);
    return fd;
}
int openat64(int dirfd, const char *path, int flags, ...) __attribute__((alias("openat")));

static int64_t where_next(int fd) {
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0 && (fl & O_APPEND)) {
        struct stat st;
        return fstat(fd, &st) == 0 ? st.st_size : -1;
    }
    return lseek(fd, 0, SEEK_CUR);
}

ssize_t write(int fd, const void *buf, size_t count) {
    if (!is_tracked(fd))
        return real_write(fd, buf, count);
    pthread_mutex_lock(&lock);
    int64_t at = where_next(fd);
    ssize_t n = real_write(fd, buf, count);
    if (n > 0)
        record(OP_WRITE, fd, at, buf, (size_t)n, NULL, 0);
    pthread_mutex_unlock(&lock);
    return n;
}

/* Each piece of a vectored write recorded at its offset, as far as `n` bytes went. */
static void record_iov(int fd, int64_t at, const struct iovec *iov, int iovcnt, ssize_t n) {
    ssize_t left = n;
    for (int i = 0; i < iovcnt && left > 0; i++) {
        size_t part = iov[i].iov_len < (size_t)left ? iov[i].iov_len : (size_t)left;
        record(OP_WRITE, fd, at, iov[i].iov_base, part, NULL, 0);
        at += (int64_t)part;
        left -= (ssize_t)part;
    }
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
    if (!is_tracked(fd))
        return real_writev(fd, iov, iovcnt);
    pthread_mutex_lock(&lock);
    int64_t at = where_next(fd);
    ssize_t n = real_writev(fd, iov, iovcnt);
    record_iov(fd, at, iov, iovcnt, n);
    pthread_mutex_unlock(&lock);
    return n;
}

/* pwritev (os.pwritev: the spool writes a message over a blank with it): recorded at
   its offset. pwritev2 with offset -1 writes at the file position. */
ssize_t pwritev(int fd, const struct iovec *iov, int iovcnt, off_t offset) {
    if (!is_tracked(fd))
        return real_pwritev(fd, iov, iovcnt, offset);
    pthread_mutex_lock(&lock);
    ssize_t n = real_pwritev(fd, iov, iovcnt, offset);
    record_iov(fd, (int64_t)offset, iov, iovcnt, n);
    pthread_mutex_unlock(&lock);
    return n;
}
ssize_t pwritev64(int fd, const struct iovec *iov, int iovcnt, off_t offset)
    __attribute__((alias("pwritev")));

ssize_t pwritev2(int fd, const struct iovec *iov, int iovcnt, off_t offset, int flags) {
    if (!is_tracked(fd))
        return real_pwritev2(fd, iov, iovcnt, offset, flags);
    pthread_mutex_lock(&lock);
    int64_t at = offset == -1 ? where_next(fd) : (int64_t)offset;
    ssize_t n = real_pwritev2(fd, iov, iovcnt, offset, flags);
    record_iov(fd, at, iov, iovcnt, n);
    pthread_mutex_unlock(&lock);
    return n;
}
ssize_t pwritev64v2(int fd, const struct iovec *iov, int iovcnt, off_t offset, int flags)
    __attribute__((alias("pwritev2")));

static ssize_t do_pwrite(ssize_t (*real)(int, const void *, size_t, off_t), int fd,
                         const void *buf, size_t count, off_t offset) {
    if (!is_tracked(fd))
        return real(fd, buf, count, offset);
    pthread_mutex_lock(&lock);
    ssize_t n = real(fd, buf, count, offset);
    if (n > 0)
        record(OP_WRITE, fd, offset, buf, (size_t)n, NULL, 0);
    pthread_mutex_unlock(&lock);
    return n;
}
ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    return do_pwrite(real_pwrite, fd, buf, count, offset);
}
ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset) {
    return do_pwrite(real_pwrite64 ? real_pwrite64 : real_pwrite, fd, buf, count, offset);
}

static int do_truncate(int (*real)(int, off_t), int fd, off_t length) {
    if (!is_tracked(fd))
        return real(fd, length);
    pthread_mutex_lock(&lock);
    int rc = real(fd, length);
    if (rc == 0)
        record(OP_TRUNC, fd, length, NULL, 0, NULL, 0);
    pthread_mutex_unlock(&lock);
    return rc;
}
int ftruncate(int fd, off_t length) { return do_truncate(real_ftruncate, fd, length); }
int ftruncate64(int fd, off_t length) {
    return do_truncate(real_ftruncate64 ? real_ftruncate64 : real_ftruncate, fd, length);
}

static int do_sync(int (*real)(int), int fd) {
    if (!is_tracked(fd))
        return real(fd);
    pthread_mutex_lock(&lock);
    record(OP_SYNC_START, fd, 0, NULL, 0, NULL, 0);
    pthread_mutex_unlock(&lock);
    int rc = real(fd);
    pthread_mutex_lock(&lock);
    if (rc == 0)
        record(OP_SYNC_DONE, fd, 0, NULL, 0, NULL, 0);
    pthread_mutex_unlock(&lock);
    return rc;
}
int fsync(int fd) { return do_sync(real_fsync, fd); }
int fdatasync(int fd) { return do_sync(real_fdatasync, fd); }

static int do_rename(int olddir, const char *old, int newdir, const char *new) {
    char a[PATH_MAX], b[PATH_MAX];
    pthread_mutex_lock(&lock);
    int ra = resolve(olddir, old, a), rb = resolve(newdir, new, b);
    int rc = (olddir == AT_FDCWD && newdir == AT_FDCWD) ? real_rename(old, new)
                                                        : real_renameat(olddir, old, newdir, new);
    if (rc == 0 && (ra || rb))
        record(OP_RENAME, -1, 0, a, ra ? strlen(a) : 0, b, rb ? strlen(b) : 0);
    pthread_mutex_unlock(&lock);
    return rc;
}
int rename(const char *old, const char *new) { return do_rename(AT_FDCWD, old, AT_FDCWD, new); }
int renameat(int olddir, const char *old, int newdir, const char *new) {
    return do_rename(olddir, old, newdir, new);
}

static int do_unlink(int dirfd, const char *path, int flags) {
    char a[PATH_MAX];
    pthread_mutex_lock(&lock);
    int ra = resolve(dirfd, path, a);
    int rc = dirfd == AT_FDCWD && flags == 0 ? real_unlink(path)
                                             : real_unlinkat(dirfd, path, flags);
    if (rc == 0 && ra)
        record((flags & AT_REMOVEDIR) ? OP_RMDIR : OP_UNLINK, -1, 0, a, strlen(a), NULL, 0);
    pthread_mutex_unlock(&lock);
    return rc;
}
int unlink(const char *path) { return do_unlink(AT_FDCWD, path, 0); }
int unlinkat(int dirfd, const char *path, int flags) { return do_unlink(dirfd, path, flags); }

int rmdir(const char *path) {
    char a[PATH_MAX];
    pthread_mutex_lock(&lock);
    int ra = resolve(AT_FDCWD, path, a);
    int rc = real_rmdir(path);
    if (rc == 0 && ra)
        record(OP_RMDIR, -1, 0, a, strlen(a), NULL, 0);
    pthread_mutex_unlock(&lock);
    return rc;
}

int mkdir(const char *path, mode_t mode) {
    char a[PATH_MAX];
    pthread_mutex_lock(&lock);
    int ra = resolve(AT_FDCWD, path, a);
    int rc = real_mkdir(path, mode);
    if (rc == 0 && ra)
        record(OP_MKDIR, -1, 0, a, strlen(a), NULL, 0);
    pthread_mutex_unlock(&lock);
    return rc;
}

int close(int fd) {
    if (!is_tracked(fd))
        return real_close(fd);
    pthread_mutex_lock(&lock);
    tracked[fd] = 0;
    record(OP_CLOSE, fd, 0, NULL, 0, NULL, 0);
    int rc = real_close(fd);
    pthread_mutex_unlock(&lock);
    return rc;
}
