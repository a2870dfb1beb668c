/* A frozen target's fd table and a list of its /proc files read in one call without Python's GIL.
 *
 * Why hand-written C: an incremental dump's collect reads ~45 /proc entries of the frozen target
 * (each fd's link, fdinfo and stat; cwd, exe, root, the namespaces' links, a few small files), about
 * 0.35 ms of the freezing thread at 6 fds and ~20 us more per fd, nearly all of it system calls.
 * A second Python thread cannot take them over: it needs the GIL between its calls, and the hand-
 * overs cost the freezing thread what they save (measured: docs/benchmarks.md, "procgrab"). One
 * foreign call through ctypes lets the GIL go for all of them, so the dump's scan thread reads them
 * on the second CPU while the freezing thread runs the injected batch. No library offers a batch
 * of readlink/read/stat calls. The Python side (ckpt/proc/grab.py) parses the records; where this
 * library is missing, or any call here fails but an fd closed in between, the collect reads
 * everything itself as before (the same bytes: the same system calls, in the same freeze).
 *
 * ops: NUL-terminated strings, the list ended by an empty one; each begins with its kind:
 *   'F'       the fd table of /proc/PID (pid given); 'F' M ',' R: only the fds equal to R modulo M
 *             (two threads read one table in halves)
 *   'r' PATH  the whole file
 *   'l' PATH  the link's text
 *   'P'       prlimit(pid, r) of every resource r < NLIMITS
 *   's' PATH  stat() of the path (a magic link followed: /proc/PID/exe's file)
 *   'T' TID   the thread's scheduling and robust list (ckpt/proc/props.py _thread_props' syscalls)
 * out: one record per op, in order, each 8-byte aligned:
 *   'r', 'l': i32 err (0 or an errno), u32 len, then len bytes
 *   'F':      i32 err (opening /proc/PID/fd; then no entries), u32 count, then count entries:
 *             i32 fd, i32 err, i32 which (0 readlink, 1 fdinfo, 2 stat: the call that failed),
 *             u32 link_len, u32 info_len, u32 pipe, u64 st_dev, st_ino, st_mode, st_size,
 *             i64 st_mtime in ns, u64 st_rdev, then the link's bytes and the fdinfo's bytes, each padded;
 *             pipe 1: then one_pipe's record of the pipe's buffered bytes.
 *   'P':      i32 0, u32 NLIMITS, then per resource: i32 err, u32 0, u64 soft, u64 hard.
 *   's':      i32 err, u32 32, then u64 st_dev, st_ino, st_size, i64 st_mtime in ns (zeros on err).
 *   'T':      i32 err (the first call's that failed, but ioprio_get's), u32 len, then i32 policy,
 *             rt_priority, nice, ioprio (-1: ioprio_get failed), u64 robust list head, its length,
 *             u32 bytes of the affinity mask, u32 0, the mask's bytes (padded).
 * Returns the bytes of out used, or -ENOSPC when out is too small. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ABI 12 /* ckpt/proc/grab.py refuses a library built from another version of this file */

int ckpt_procgrab_abi(void) { return ABI; }

struct out {
    char *p;
    size_t len, cap;
    int full;
};

static size_t pad8(size_t n) { return (n + 7) & ~(size_t)7; }

/* Room for n bytes at the end of out (8-aligned), or NULL and out marked full. */
static char *take(struct out *o, size_t n) {
    if (o->full || o->cap - o->len < pad8(n)) {
        o->full = 1;
        return NULL;
    }
    char *r = o->p + o->len;
    o->len += pad8(n);
    return r;
}

/* The whole file at dirfd/path read into out, after the 8-byte header at hdr; its length. */
static int64_t read_into(struct out *o, int dirfd, const char *path, int *err) {
    int fd = openat(dirfd, path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        *err = errno;
        return 0;
    }
    size_t start = o->len, got = 0;
    for (;;) {
        size_t room = o->cap - start - got;
        if (room == 0) {
            o->full = 1;
            break;
        }
        ssize_t n = read(fd, o->p + start + got, room);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            *err = errno;
            got = 0;
            break;
        }
        if (n == 0)
            break;
        got += (size_t)n;
    }
    close(fd);
    if (o->full)
        return 0;
    if (o->cap - start < pad8(got)) {
        o->full = 1;
        return 0;
    }
    o->len = start + pad8(got);
    return (int64_t)got;
}

static void one_file(struct out *o, const char *path, int link) {
    char *hdr = take(o, 8);
    if (!hdr)
        return;
    int32_t err = 0;
    uint32_t len = 0;
    if (link) {
        char buf[PATH_MAX];
        ssize_t n = readlink(path, buf, sizeof buf);
        if (n < 0) {
            err = errno;
        } else {
            char *d = take(o, (size_t)n);
            if (!d)
                return;
            memcpy(d, buf, (size_t)n);
            len = (uint32_t)n;
        }
    } else {
        int e = 0;
        int64_t n = read_into(o, AT_FDCWD, path, &e);
        if (o->full)
            return;
        err = e;
        len = (uint32_t)n;
    }
    memcpy(hdr, &err, 4);
    memcpy(hdr + 4, &len, 4);
}

struct fdhdr {
    int32_t fd, err, which;
    uint32_t link_len, info_len, pipe;
    uint64_t dev, ino, mode, size;
    int64_t mtime_ns;
    uint64_t rdev;
};

#define PIPE_MAX (64 << 10) /* bytes of a pipe's buffer read here; more: read by ckpt/proc/pipes.py */
#define MAX_PIPES 64        /* pipes read here per table (or share of it); more: read by pipes.py */

/* A pipe's buffered bytes as ckpt/proc/pipes.py read_pipes reads them (pidfd_getfd of a read end,
 * or for an anonymous pipe's write end a new read end opened through /proc/PID/fd/N; then tee into
 * a pipe of our own, which never takes a byte from the process's): i32 err, u32 pipe size, u64
 * len, then len bytes. Any error, or more than PIPE_MAX bytes, is left for pipes.py to meet again. */
static void one_pipe(struct out *o, int *pidfd, int pid, int dfd, const char *name, int fd, int reader) {
    char *hdr = take(o, 16);
    if (!hdr)
        return;
    int32_t err = 0;
    uint32_t size = 0;
    uint64_t len = 0;
    int local = -1, p[2] = {-1, -1};
    if (reader) {
        if (*pidfd < 0)
            *pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
        local = *pidfd < 0 ? -1 : (int)syscall(SYS_pidfd_getfd, *pidfd, fd, 0);
    } else {
        local = openat(dfd, name, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    }
    int sz = -1, avail = 0;
    if (local < 0 || (sz = fcntl(local, F_GETPIPE_SZ)) < 0 || ioctl(local, FIONREAD, &avail) < 0) {
        err = errno ? errno : EBADF;
        goto done;
    }
    size = (uint32_t)sz;
    if (avail > PIPE_MAX) {
        err = EFBIG;
        goto done;
    }
    if (avail > 0) {
        if (pipe2(p, O_CLOEXEC | O_NONBLOCK) < 0 || fcntl(p[1], F_SETPIPE_SZ, sz) < avail) {
            err = errno ? errno : ENOSPC;
            goto done;
        }
        ssize_t n = tee(local, p[1], (size_t)avail, SPLICE_F_NONBLOCK);
        if (n != avail) {
            err = n < 0 ? errno : EAGAIN;
            goto done;
        }
        char *d = take(o, (size_t)avail);
        if (!d)
            goto done;
        size_t got = 0;
        while (got < (size_t)avail) {
            ssize_t r = read(p[0], d + got, (size_t)avail - got);
            if (r <= 0) {
                err = r < 0 ? errno : EIO;
                break;
            }
            got += (size_t)r;
        }
        len = err ? 0 : (uint64_t)avail;
    }
done:
    for (int i = 0; i < 2; i++)
        if (p[i] >= 0)
            close(p[i]);
    if (local >= 0)
        close(local);
    if (err)
        size = 0, len = 0;
    memcpy(hdr, &err, 4);
    memcpy(hdr + 4, &size, 4);
    memcpy(hdr + 8, &len, 8);
}

/* The open flags' access mode from an fdinfo text ("flags:\t0100002"): whether it reads. */
static int reads(const char *info, size_t n) {
    for (size_t i = 0; i + 7 < n; i++) {
        if ((i == 0 || info[i - 1] == '\n') && !memcmp(info + i, "flags:", 6)) {
            unsigned long fl = strtoul(info + i + 6, NULL, 8);
            return (fl & O_ACCMODE) != O_WRONLY;
        }
    }
    return 1;
}

static void fd_table(struct out *o, int pid, int mod, int rem) {
    char *hdr = take(o, 8);
    if (!hdr)
        return;
    int32_t err = 0;
    uint32_t count = 0;
    int pidfd = -1, npipes = 0;
    uint64_t piped[MAX_PIPES];
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/fd", pid);
    int dfd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    snprintf(path, sizeof path, "/proc/%d/fdinfo", pid);
    int ifd = dfd < 0 ? -1 : open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *dir = NULL;
    if (dfd < 0 || ifd < 0 || !(dir = fdopendir(dup(dfd)))) {
        err = errno;
        goto done;
    }
    struct dirent *de;
    for (;;) {
        errno = 0;
        if ((de = readdir(dir)) == NULL) {
            err = errno; /* 0 at the end; a listing cut short is an error, never a shorter table */
            break;
        }
        if (de->d_name[0] < '0' || de->d_name[0] > '9')
            continue;
        if (mod > 1 && atoi(de->d_name) % mod != rem)
            continue;
        struct fdhdr *h = (struct fdhdr *)take(o, sizeof *h);
        if (!h)
            break;
        memset(h, 0, sizeof *h);
        h->fd = atoi(de->d_name);
        char link[PATH_MAX];
        ssize_t n = readlinkat(dfd, de->d_name, link, sizeof link);
        if (n < 0) {
            h->err = errno;
            h->which = 0;
            count++;
            continue;
        }
        char *d = take(o, (size_t)n);
        if (!d)
            break;
        memcpy(d, link, (size_t)n);
        h->link_len = (uint32_t)n;
        int e = 0;
        int64_t m = read_into(o, ifd, de->d_name, &e);
        if (o->full)
            break;
        if (e) {
            h->err = e;
            h->which = 1;
            count++;
            continue;
        }
        h->info_len = (uint32_t)m;
        struct stat st;
        if (fstatat(dfd, de->d_name, &st, 0) < 0) { /* follows the magic link to the open file */
            h->err = errno;
            h->which = 2;
            count++;
            continue;
        }
        h->dev = st.st_dev;
        h->ino = st.st_ino;
        h->mode = st.st_mode;
        h->size = (uint64_t)st.st_size;
        h->mtime_ns = (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec;
        h->rdev = st.st_rdev;
        count++;
        if (S_ISFIFO(st.st_mode) && npipes < MAX_PIPES) {
            /* Its buffered bytes, once per pipe (by inode) in this table: through a read end, or,
             * an anonymous pipe's, a write end (a FIFO's writer alone is left to pipes.py: a new
             * reader would let a writer blocked in open() elsewhere through). */
            int seen = 0;
            for (int i = 0; i < npipes; i++)
                seen |= piped[i] == st.st_ino;
            int reader = reads(o->p + o->len - pad8((size_t)m), (size_t)m);
            if (!seen && (reader || !strncmp(link, "pipe:", 5))) {
                piped[npipes++] = st.st_ino;
                h->pipe = 1;
                errno = 0;
                one_pipe(o, &pidfd, pid, dfd, de->d_name, h->fd, reader);
                if (o->full)
                    break;
            }
        }
    }
done:
    if (pidfd >= 0)
        close(pidfd);
    if (dir)
        closedir(dir);
    if (ifd >= 0)
        close(ifd);
    if (dfd >= 0)
        close(dfd);
    memcpy(hdr, &err, 4);
    memcpy(hdr + 4, &count, 4);
}

#define NLIMITS 16

static void limits(struct out *o, int pid) {
    char *hdr = take(o, 8 + NLIMITS * 24);
    if (!hdr)
        return;
    int32_t zero = 0;
    uint32_t count = NLIMITS;
    memcpy(hdr, &zero, 4);
    memcpy(hdr + 4, &count, 4);
    for (int r = 0; r < NLIMITS; r++) {
        char *row = hdr + 8 + r * 24;
        struct rlimit rl = {0, 0};
        int32_t err = prlimit(pid, r, NULL, &rl) < 0 ? errno : 0;
        uint64_t soft = rl.rlim_cur, hard = rl.rlim_max;
        memset(row, 0, 8);
        memcpy(row, &err, 4);
        memcpy(row + 8, &soft, 8);
        memcpy(row + 16, &hard, 8);
    }
}

static void one_stat(struct out *o, const char *path) {
    char *hdr = take(o, 8 + 32);
    if (!hdr)
        return;
    struct stat st;
    int32_t err = stat(path, &st) < 0 ? errno : 0;
    uint32_t len = 32;
    uint64_t row[4] = {0, 0, 0, 0};
    if (!err) {
        row[0] = st.st_dev;
        row[1] = st.st_ino;
        row[2] = (uint64_t)st.st_size;
        row[3] = (uint64_t)((int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec);
    }
    memcpy(hdr, &err, 4);
    memcpy(hdr + 4, &len, 4);
    memcpy(hdr + 8, row, 32);
}

static void one_thread(struct out *o, int tid) {
    cpu_set_t cpus;
    size_t mbytes = sizeof cpus;
    char *hdr = take(o, 8 + 40 + pad8(mbytes));
    if (!hdr)
        return;
    memset(hdr, 0, 8 + 40 + pad8(mbytes));
    int32_t err = 0, v[4] = {0, 0, 0, -1};
    struct sched_param sp = {0};
    uint64_t robust[2] = {0, 0};
    void *head = NULL;
    size_t len = 0;
    v[0] = sched_getscheduler(tid);
    if (v[0] < 0 || sched_getparam(tid, &sp) < 0)
        err = errno;
    v[1] = sp.sched_priority;
    errno = 0;
    v[2] = getpriority(PRIO_PROCESS, (id_t)tid);
    if (!err && errno)
        err = errno;
    v[3] = (int32_t)syscall(SYS_ioprio_get, 1 /* IOPRIO_WHO_PROCESS */, tid);
    if (!err && syscall(SYS_get_robust_list, tid, &head, &len) < 0)
        err = errno;
    robust[0] = (uint64_t)(uintptr_t)head;
    robust[1] = len;
    CPU_ZERO(&cpus);
    if (!err && sched_getaffinity(tid, sizeof cpus, &cpus) < 0)
        err = errno;
    uint32_t total = 40 + (uint32_t)mbytes, nb = (uint32_t)mbytes;
    memcpy(hdr, &err, 4);
    memcpy(hdr + 4, &total, 4);
    memcpy(hdr + 8, v, 16);
    memcpy(hdr + 24, robust, 16);
    memcpy(hdr + 40, &nb, 4);
    memcpy(hdr + 48, &cpus, mbytes);
}

int64_t ckpt_grab(int pid, const char *ops, char *out, size_t cap) {
    struct out o = {out, 0, cap, 0};
    for (const char *op = ops; *op && !o.full; op += strlen(op) + 1) {
        if (op[0] == 'F') {
            int mod = 1, rem = 0;
            if (op[1] && sscanf(op + 1, "%d,%d", &mod, &rem) != 2)
                mod = 1, rem = 0;
            fd_table(&o, pid, mod, rem);
        }
        else if (op[0] == 'P')
            limits(&o, pid);
        else if (op[0] == 's')
            one_stat(&o, op + 1);
        else if (op[0] == 'T')
            one_thread(&o, atoi(op + 1));
        else
            one_file(&o, op + 1, op[0] == 'l');
    }
    return o.full ? -ENOSPC : (int64_t)o.len;
}

/* PAGEMAP_SCAN walks on a thread of their own (ckpt/track/uffdwp.py: an incremental's dirty and hole
 * scans, beside the collect). A Python thread for them needed the GIL to begin each walk and between
 * its calls, which the collect held: they began late, and ended after it. Each walk is the loop of
 * ckpt/memory.py PagemapScanner._walk, call for call (the same resumption after a full vector).
 *
 * specs: 7 u64 per walk: start, end, flags, category_inverted, category_mask, category_anyof_mask,
 * return_mask. out, per walk: i64 err (0, an errno, or ENOSPC: out had no room for another full
 * vector), u64 calls, u64 resume, u64 floor (with ENOSPC: where the walk is to go on, its floor
 * there; the calls made are kept: a WP_MATCHING walk has re-armed what they report), then per
 * call: u64 n, u64 floor, n regions of 24 bytes. The walks after one that ran out of room are not
 * made (out ends before their headers). Returns the bytes of out used. */
#define VEC_LEN 4096
#define USER_ADDR_MAX 0x7FFFFFFFF000ull
#define PAGEMAP_SCAN_IOCTL 0xC0606610

struct pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages, category_inverted,
        category_mask, category_anyof_mask, return_mask;
};

int64_t ckpt_scans(int fd, const uint64_t *specs, size_t nspecs, char *out, size_t cap) {
    size_t len = 0;
    for (size_t i = 0; i < nspecs; i++) {
        const uint64_t *sp = specs + 7 * i;
        if (cap - len < 32)
            break;
        char *hdr = out + len;
        len += 32;
        int64_t err = 0;
        uint64_t calls = 0, start = sp[0], end = sp[1] < USER_ADDR_MAX ? sp[1] : USER_ADDR_MAX, floor = 0;
        while (start < end) {
            if (cap - len < 16 + (size_t)VEC_LEN * 24) {
                err = ENOSPC;
                break;
            }
            uint64_t *call = (uint64_t *)(out + len);
            struct pm_scan_arg arg = {sizeof arg, sp[2], start, end, 0, (uint64_t)(uintptr_t)(call + 2),
                                      VEC_LEN, 0, sp[3], sp[4], sp[5], sp[6]};
            long n = ioctl(fd, PAGEMAP_SCAN_IOCTL, &arg);
            if (n < 0) {
                err = errno;
                break;
            }
            call[0] = (uint64_t)n;
            call[1] = floor;
            len += 16 + (size_t)n * 24;
            calls++;
            if (n < VEC_LEN)
                break;
            uint64_t last_end = call[2 + 3 * (n - 1) + 1];
            uint64_t nxt = arg.walk_end > last_end ? arg.walk_end : last_end;
            if (nxt <= start)
                break;
            start = floor = nxt;
        }
        memcpy(hdr, &err, 8);
        memcpy(hdr + 8, &calls, 8);
        memcpy(hdr + 16, &start, 8);
        memcpy(hdr + 24, &floor, 8);
        if (err == ENOSPC)
            break;
    }
    return (int64_t)len;
}

/* ckpt_grab and ckpt_scans on a thread of their own, started here and joined by ckpt_join: no
 * Python thread is woken, and none needs the GIL to begin or to end the work (a pool thread waited
 * ~0.8 ms for the GIL to start the call, while the freezing thread ran Python). The thread blocks
 * every signal (ckpt's threads keep SIGCHLD for the freezing one: ckpt/ptrace/sigchld.py). The
 * start functions return NULL where no thread could be made: the caller does the work itself.
 *
 * The thread is one of the workers ckpt_workers made before the freeze, waiting in a futex, where
 * one is idle: handing it the job costs the caller one futex wake, where pthread_create cost it
 * 50-70 us inside a freeze here (a grab right after the seize, the dirty scans after the batch:
 * both before work that waits for them). Otherwise a thread is made for the job as before. */
/* A second group of walks after a scans job's own (ckpt_scans_pair_start): made by whichever comes
 * for it first, the job's thread once its own walks are done, or the joiner (ckpt_scans_pair_join),
 * which otherwise would only wait. An incremental's dirty scan and hole scan walk the same page
 * tables one after the other: at 1 GiB ~1.3 ms each, while the freezing thread, its collect done,
 * waited ~2 ms for them. Claimed once (claimed: 0 -> 1), so never made twice nor by two at once. */
struct then {
    int fd;
    size_t n;
    const uint64_t *specs;
    char *out;
    size_t cap;
    int64_t result;
    _Atomic int claimed;
};

struct job {
    pthread_t th;
    int scans; /* 0: ckpt_grab(id = pid, data = ops); 1: ckpt_scans(id = pagemap fd, data = specs) */
    int id;
    size_t n; /* specs */
    char *out;
    size_t cap;
    int64_t result;
    int pooled;       /* run by a worker: ckpt_join waits for done, not for the thread's end */
    _Atomic int done; /* set by the worker once it no longer touches the job */
    struct then *then; /* scans: the walks to claim after these (NULL: none) */
    uint64_t data[];
};

static void claim_then(struct then *t) {
    int free_ = 0;
    if (t && atomic_compare_exchange_strong(&t->claimed, &free_, 1))
        t->result = ckpt_scans(t->fd, t->specs, t->n, t->out, t->cap);
}

static void *run(void *arg) {
    struct job *j = arg;
    j->result = j->scans ? ckpt_scans(j->id, j->data, j->n, j->out, j->cap)
                         : ckpt_grab(j->id, (const char *)j->data, j->out, j->cap);
    if (j->scans)
        claim_then(j->then);
    return NULL;
}

static long futex(_Atomic int *addr, int op, int val) {
    return syscall(SYS_futex, (int *)addr, op, val, NULL, NULL, 0);
}

#define MAX_WORKERS 4
struct worker {
    pthread_t th;
    _Atomic int busy; /* 0 idle (claimable), 1 claimed for a job or running one */
    _Atomic int seq;  /* bumped for each job posted: the worker's futex word */
    struct job *job;  /* NULL with seq bumped: end (ckpt_workers_end) */
};
static struct worker workers[MAX_WORKERS];
static _Atomic int nworkers;
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;

static void *worker_main(void *arg) {
    struct worker *w = arg;
    int seen = 0;
    for (;;) {
        int now;
        while ((now = atomic_load(&w->seq)) == seen)
            futex(&w->seq, FUTEX_WAIT_PRIVATE, seen);
        seen = now;
        struct job *j = w->job;
        if (!j)
            return NULL;
        w->job = NULL;
        run(j);
        atomic_store(&j->done, 1); /* the joiner may free j from here on */
        futex(&j->done, FUTEX_WAKE_PRIVATE, INT32_MAX);
        atomic_store(&w->busy, 0);
    }
    return NULL;
}

/* A forked child has none of the parent's threads: its workers are gone (a fork of ckpt, e.g. a
 * service's worker, makes its own when it asks). */
static void forget_workers(void) {
    memset(workers, 0, sizeof workers);
    atomic_store(&nworkers, 0);
    pthread_mutex_init(&pool_lock, NULL);
}

/* Make workers until there are n (at most MAX_WORKERS); returns how many there are. Call it out of
 * any freeze: their start is what it spares the freeze. */
int ckpt_workers(int n) {
    static int atfork;
    pthread_mutex_lock(&pool_lock);
    if (!atfork) {
        pthread_atfork(NULL, NULL, forget_workers);
        atfork = 1;
    }
    int have = atomic_load(&nworkers);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    for (; have < n && have < MAX_WORKERS; have++) {
        struct worker *w = &workers[have];
        atomic_store(&w->busy, 0);
        atomic_store(&w->seq, 0);
        w->job = NULL;
        if (pthread_create(&w->th, NULL, worker_main, w))
            break;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    atomic_store(&nworkers, have);
    pthread_mutex_unlock(&pool_lock);
    return have;
}

/* Every worker ended and joined (a fork server must have no thread but its own: ckpt/forkwarm.py),
 * each once its job, if any, is done; returns how many there were. Not while jobs are being posted
 * (workers are only ever used by the thread of a freeze). */
int ckpt_workers_end(void) {
    pthread_mutex_lock(&pool_lock);
    int n = atomic_load(&nworkers);
    atomic_store(&nworkers, 0);
    for (int i = 0; i < n; i++) {
        struct worker *w = &workers[i];
        int idle = 0;
        while (!atomic_compare_exchange_strong(&w->busy, &idle, 1)) {
            idle = 0;
            sched_yield();
        }
        w->job = NULL;
        atomic_fetch_add(&w->seq, 1);
        futex(&w->seq, FUTEX_WAKE_PRIVATE, 1);
        pthread_join(w->th, NULL);
    }
    pthread_mutex_unlock(&pool_lock);
    return n;
}

/* An idle worker given job j (1), or none idle (0). */
static int post(struct job *j) {
    int n = atomic_load(&nworkers);
    for (int i = 0; i < n; i++) {
        struct worker *w = &workers[i];
        int idle = 0;
        if (atomic_compare_exchange_strong(&w->busy, &idle, 1)) {
            j->pooled = 1;
            w->job = j;
            atomic_fetch_add(&w->seq, 1);
            futex(&w->seq, FUTEX_WAKE_PRIVATE, 1);
            return 1;
        }
    }
    return 0;
}

/* (then: the job's, freed with it, also where it could not start) */
static void *start(int scans, int id, const void *data, size_t len, size_t n, char *out, size_t cap,
                   struct then *then) {
    struct job *j = calloc(1, sizeof *j + len);
    if (!j) {
        free(then);
        return NULL;
    }
    j->scans = scans;
    j->id = id;
    j->n = n;
    j->out = out;
    j->cap = cap;
    j->then = then;
    memcpy(j->data, data, len);
    if (post(j))
        return j;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int e = pthread_create(&j->th, NULL, run, j);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (e) {
        free(then);
        free(j);
        return NULL;
    }
    return j;
}

void *ckpt_grab_start(int pid, const char *ops, size_t ops_len, char *out, size_t cap) {
    return start(0, pid, ops, ops_len, 0, out, cap, NULL);
}

void *ckpt_scans_start(int fd, const uint64_t *specs, size_t nspecs, char *out, size_t cap) {
    return start(1, fd, specs, nspecs * 7 * sizeof(uint64_t), nspecs, out, cap, NULL);
}

/* Once the job is done (its thread no longer touches it): its result, the second group's in
 * *result2 (if any), both freed. */
static int64_t joined(struct job *j, int64_t *result2) {
    if (j->pooled) {
        while (!atomic_load(&j->done))
            futex(&j->done, FUTEX_WAIT_PRIVATE, 0);
    } else {
        pthread_join(j->th, NULL);
    }
    int64_t r = j->result;
    if (result2 && j->then)
        *result2 = j->then->result;
    free(j->then);
    free(j);
    return r;
}

int64_t ckpt_join(void *handle) { return joined(handle, NULL); }

/* ckpt_scans_start's walks (specs, out, cap), then a second group of them (specs2, out2, cap2) made
 * by the job's thread after its own or by the joiner, whichever comes first (struct then). The
 * second group's specs are copied; both outputs are ckpt_scans'. NULL: nothing started. */
void *ckpt_scans_pair_start(int fd, const uint64_t *specs, size_t nspecs, char *out, size_t cap,
                            const uint64_t *specs2, size_t nspecs2, char *out2, size_t cap2) {
    struct then *t = calloc(1, sizeof *t + nspecs2 * 7 * sizeof(uint64_t));
    if (!t)
        return NULL;
    uint64_t *copy = (uint64_t *)(t + 1);
    memcpy(copy, specs2, nspecs2 * 7 * sizeof(uint64_t));
    *t = (struct then){fd, nspecs2, copy, out2, cap2, 0, 0};
    return start(1, fd, specs, nspecs * 7 * sizeof(uint64_t), nspecs, out, cap, t);
}

/* The pair joined: the second group made here if its thread has not begun it (the GIL let go by
 * the caller), then the job waited for; its result returned, the second group's in *result2. */
int64_t ckpt_scans_pair_join(void *handle, int64_t *result2) {
    struct job *j = handle;
    claim_then(j->then); /* (the job's thread reads it too: freed once it is done) */
    return joined(j, result2);
}
