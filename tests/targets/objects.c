/* A restore target that keeps shared objects and special fds, and checks them itself.
 *
 * usage: objects LIST DIR
 * LIST is a comma-separated list of the kinds below; DIR a scratch directory. Each kind is set up
 * at start; `check` reads everything back the way the program would see it and answers one line:
 * "ok" or "bad NAME: what it found; ...". Between commands it blocks in read(0).
 *
 *   memfd      memfd "ckpt-memfd" (CLOEXEC, ALLOW_SEALING), 64 pages, pages 0 and 2 written (the
 *              rest holes), fd at offset 123, mapped MAP_SHARED (4 pages) and MAP_PRIVATE (4 pages,
 *              page 0 changed privately), sealed SHRINK|GROW; a second memfd "ckpt-maponly"
 *              mapped shared with its fd closed. Checked: names, seals, offset, size, bytes, the
 *              shared mapping coherent with the fd, the private copy private
 *   ghost      DIR/ghost.bin (mode 0640, 2 pages) open O_RDWR at offset 77, mapped shared and
 *              private, then unlinked: name, mode, nlink 0, bytes, coherence
 *   cwdgone    DIR/wd made, entered and removed: the working directory still reads "(deleted)"
 *   posixshm   shm_open("/ckpt-test-PID"), 2 pages, mapped shared, fd kept: bytes, coherence
 *   sysv       a SysV segment with key 0x5ce0PPPP (PID's low bits), 3 pages, attached: bytes,
 *              IPC_STAT of the same id, nattch
 *   sysvrm     an IPC_PRIVATE segment, attached, then IPC_RMID: bytes, SHM_DEST still set
 *   hugeshm    4 MiB MAP_SHARED|MAP_ANONYMOUS with MADV_HUGEPAGE: bytes, VmFlags "hg", still shared
 *   opath      DIR/plain opened O_PATH and the symlink DIR/link opened O_PATH|O_NOFOLLOW: flags,
 *              and what each names (fstatat AT_EMPTY_PATH: a regular file, a symlink)
 *   nsfd       /proc/self/ns/net and /proc/self/ns/uts open: inodes equal to the namespaces'
 *   tcplisten  127.0.0.1:0 listening (backlog 7, SO_REUSEADDR, TCP_DEFER_ACCEPT 5) and [::1]:0
 *              (backlog 3, IPV6_V6ONLY, O_NONBLOCK): addresses, options, flags, and a connection
 *              accepted on each; `ports` prints both ports
 *   udp        a UDP socket bound to 127.0.0.1:0 and one connected to it (bound by the connect):
 *              addresses, the peer, a datagram from one to the other; `udppend` leaves one unread
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/ipc.h>
#include <sys/socket.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "lineio.h"

#define PG 4096

static char report[8192];
static size_t rlen;
static const char *dir;
static int mfd = -1, gfd = -1, pfd = -1, opfd = -1, lnfd = -1, nsnet = -1, nsuts = -1;
static unsigned char *mshared, *mpriv, *monly, *gshared, *gpriv, *pshm, *sv, *svrm, *huge;
static int svid = -1, svrmid = -1, msalt = 1, psalt = 9;
static char cwd0[4096], pshm_name[64];
static ino_t netino, utsino;
static int l4 = -1, l6 = -1, port4, port6, ur = -1, uc = -1, urport, ucport;

static void bad(const char *name, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void bad(const char *name, const char *fmt, ...) {
    va_list ap;
    if (rlen < sizeof report)
        rlen += snprintf(report + rlen, sizeof report - rlen, "%s%s: ", rlen ? "; " : "bad ", name);
    va_start(ap, fmt);
    if (rlen < sizeof report) rlen += vsnprintf(report + rlen, sizeof report - rlen, fmt, ap);
    va_end(ap);
}

static void die(const char *what) { printf("setup failed: %s: %s\n", what, strerror(errno)); fflush(stdout); _exit(3); }

static unsigned char pat(size_t i, int salt) { return (unsigned char)(i * 31 + i / PG + salt); }

static void fill(unsigned char *p, size_t off, size_t n, int salt) {
    for (size_t i = 0; i < n; i++) p[i] = pat(off + i, salt);
}

static int same(const unsigned char *p, size_t off, size_t n, int salt) {
    for (size_t i = 0; i < n; i++)
        if (p[i] != pat(off + i, salt)) return 0;
    return 1;
}

static int zeros(const unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (p[i]) return 0;
    return 1;
}

static void link_is(const char *name, int fd, const char *want) {
    char path[64], got[4096] = {0};
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    if (readlink(path, got, sizeof got - 1) < 0) bad(name, "readlink fd %d: %s", fd, strerror(errno));
    else if (strcmp(got, want)) bad(name, "fd %d names %s, not %s", fd, got, want);
}

static int has_flag(void *addr, const char *flag) {
    FILE *f = fopen("/proc/self/smaps", "r");
    char ln[512];
    int in = 0, found = 0;
    if (!f) return 0;
    while (fgets(ln, sizeof ln, f)) {
        unsigned long s, e;
        if (sscanf(ln, "%lx-%lx ", &s, &e) == 2 && strchr(ln, ' ') && ln[strspn(ln, "0123456789abcdef")] == '-')
            in = (uintptr_t)addr >= s && (uintptr_t)addr < e;
        else if (in && !strncmp(ln, "VmFlags:", 8)) {
            char want[8];
            snprintf(want, sizeof want, " %s", flag);
            found = strstr(ln, want) != NULL;
            break;
        }
    }
    fclose(f);
    return found;
}

/* A forked child's write must reach the parent: the mapping is still shared. */
static int still_shared(unsigned char *p) {
    unsigned char old = p[5];
    pid_t c = fork();
    if (c == 0) { p[5] = (unsigned char)(old + 1); _exit(0); }
    int st;
    waitpid(c, &st, 0);
    int ok = p[5] == (unsigned char)(old + 1);
    p[5] = old;
    return ok;
}

static int port_of(int fd) {
    struct sockaddr_in6 sa;
    socklen_t len = sizeof sa;
    if (getsockname(fd, (struct sockaddr *)&sa, &len)) return -1;
    return ntohs(sa.sin6_port); /* sin_port and sin6_port are at the same offset */
}

static int getopt_int(int fd, int level, int opt) {
    int v = -1;
    socklen_t len = sizeof v;
    return getsockopt(fd, level, opt, &v, &len) ? -1 : v;
}

/* A client connects and sends a byte; the listener accepts it and reads the byte. The client
 * closes first, so that the TIME_WAIT is on its side: one on the listener's port would make a bind
 * without SO_REUSEADDR there fail for a minute (a restore's too). */
static int accepts(int l, int family, int port) {
    struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_port = htons(port), .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    int c = socket(family, SOCK_STREAM, 0), ok = 0;
    if (c < 0) return 0;
    if (!connect(c, family == AF_INET ? (struct sockaddr *)&a4 : (struct sockaddr *)&a6,
                 family == AF_INET ? sizeof a4 : sizeof a6) && write(c, "x", 1) == 1) {
        int fl = fcntl(l, F_GETFL);
        fcntl(l, F_SETFL, fl & ~O_NONBLOCK);
        int s = accept(l, NULL, NULL);
        fcntl(l, F_SETFL, fl);
        char b;
        ok = s >= 0 && read(s, &b, 1) == 1 && b == 'x';
        close(c);
        c = -1;
        if (s >= 0) {
            ok = ok && read(s, &b, 1) == 0; /* the client's FIN */
            close(s);
        }
    }
    if (c >= 0) close(c);
    return ok;
}

static void setup(const char *list) {
    char path[4096];
    if (strstr(list, "memfd")) {
        mfd = memfd_create("ckpt-memfd", MFD_CLOEXEC | MFD_ALLOW_SEALING);
        if (mfd < 0 || ftruncate(mfd, 64 * PG)) die("memfd");
        mshared = mmap(NULL, 4 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
        if (mshared == MAP_FAILED) die("mmap memfd");
        fill(mshared, 0, PG, 1);
        fill(mshared + 2 * PG, 2 * PG, PG, 1);
        mpriv = mmap(NULL, 4 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, mfd, 0);
        if (mpriv == MAP_FAILED) die("mmap memfd private");
        fill(mpriv, 0, PG, 9); /* page 0 private; page 2 read through from the memfd */
        if (lseek(mfd, 123, SEEK_SET) != 123) die("lseek memfd");
        if (fcntl(mfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW)) die("seals");
        int m2 = memfd_create("ckpt-maponly", 0);
        if (m2 < 0 || ftruncate(m2, 2 * PG)) die("memfd 2");
        monly = mmap(NULL, 2 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, m2, 0);
        if (monly == MAP_FAILED) die("mmap memfd 2");
        close(m2);
        fill(monly + PG, PG, PG, 2);
    }
    if (strstr(list, "ghost")) {
        snprintf(path, sizeof path, "%s/ghost.bin", dir);
        gfd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0640);
        if (gfd < 0 || fchmod(gfd, 0640) || ftruncate(gfd, 2 * PG)) die("ghost");
        gshared = mmap(NULL, 2 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, gfd, 0);
        gpriv = mmap(NULL, 2 * PG, PROT_READ, MAP_PRIVATE, gfd, 0);
        if (gshared == MAP_FAILED || gpriv == MAP_FAILED) die("mmap ghost");
        fill(gshared, 0, 2 * PG, 3);
        if (lseek(gfd, 77, SEEK_SET) != 77 || unlink(path)) die("unlink ghost");
    }
    if (strstr(list, "cwdgone")) {
        snprintf(cwd0, sizeof cwd0, "%s/wd", dir);
        if (mkdir(cwd0, 0700) || chdir(cwd0) || rmdir(cwd0)) die("cwdgone");
        strcat(cwd0, " (deleted)");
    }
    if (strstr(list, "posixshm")) {
        snprintf(pshm_name, sizeof pshm_name, "/ckpt-test-%d", getpid());
        pfd = shm_open(pshm_name, O_RDWR | O_CREAT | O_EXCL, 0600);
        if (pfd < 0 || ftruncate(pfd, 2 * PG)) die("shm_open");
        pshm = mmap(NULL, 2 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, pfd, 0);
        if (pshm == MAP_FAILED) die("mmap shm");
        fill(pshm, 0, 2 * PG, 4);
    }
    if (strstr(list, "sysvrm")) {
        svrmid = shmget(IPC_PRIVATE, 2 * PG, IPC_CREAT | 0600);
        if (svrmid < 0) die("shmget private");
        svrm = shmat(svrmid, NULL, 0);
        if (svrm == (void *)-1) die("shmat private");
        fill(svrm, 0, PG, 6);
        if (shmctl(svrmid, IPC_RMID, NULL)) die("IPC_RMID");
    } else if (strstr(list, "sysv")) {
        svid = shmget(0x5ce00000 | (getpid() & 0xffff), 3 * PG, IPC_CREAT | IPC_EXCL | 0640);
        if (svid < 0) die("shmget");
        sv = shmat(svid, NULL, 0);
        if (sv == (void *)-1) die("shmat");
        fill(sv, 0, PG, 5);
        fill(sv + 2 * PG, 2 * PG, PG, 5);
    }
    if (strstr(list, "hugeshm")) {
        huge = mmap(NULL, 4 << 20, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (huge == MAP_FAILED || madvise(huge, 4 << 20, MADV_HUGEPAGE)) die("hugeshm");
        for (size_t off = 0; off < (4 << 20); off += 256 * PG) fill(huge + off, off, PG, 7);
    }
    if (strstr(list, "opath")) {
        char lpath[4096];
        snprintf(path, sizeof path, "%s/plain", dir);
        snprintf(lpath, sizeof lpath, "%s/link", dir);
        int f = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (f < 0 || symlink("plain", lpath)) die("opath files");
        close(f);
        opfd = open(path, O_PATH);
        lnfd = open(lpath, O_PATH | O_NOFOLLOW);
        if (opfd < 0 || lnfd < 0) die("O_PATH");
    }
    if (strstr(list, "tcplisten")) {
        struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
        int one = 1, five = 5;
        l4 = socket(AF_INET, SOCK_STREAM, 0);
        l6 = socket(AF_INET6, SOCK_STREAM | SOCK_NONBLOCK, 0);
        if (l4 < 0 || l6 < 0) die("socket");
        if (setsockopt(l4, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) ||
            setsockopt(l4, IPPROTO_TCP, TCP_DEFER_ACCEPT, &five, sizeof five) ||
            setsockopt(l6, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one))
            die("setsockopt");
        if (bind(l4, (struct sockaddr *)&a4, sizeof a4) || listen(l4, 7)) die("listen 4");
        if (bind(l6, (struct sockaddr *)&a6, sizeof a6) || listen(l6, 3)) die("listen 6");
        port4 = port_of(l4);
        port6 = port_of(l6);
    }
    if (strstr(list, "udp")) {
        struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        ur = socket(AF_INET, SOCK_DGRAM, 0);
        uc = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        if (ur < 0 || uc < 0 || bind(ur, (struct sockaddr *)&a4, sizeof a4)) die("udp");
        urport = port_of(ur);
        a4.sin_port = htons(urport);
        if (connect(uc, (struct sockaddr *)&a4, sizeof a4)) die("udp connect");
        ucport = port_of(uc);
    }
    if (strstr(list, "nsfd")) {
        struct stat st;
        nsnet = open("/proc/self/ns/net", O_RDONLY);
        nsuts = open("/proc/self/ns/uts", O_RDONLY);
        if (nsnet < 0 || nsuts < 0) die("ns");
        if (stat("/proc/self/ns/net", &st)) die("stat ns");
        netino = st.st_ino;
        if (stat("/proc/self/ns/uts", &st)) die("stat ns");
        utsino = st.st_ino;
    }
}

static void check(const char *list) {
    char want[4096];
    unsigned char buf[PG];
    struct stat st;
    rlen = 0;
    if (mfd >= 0) {
        link_is("memfd", mfd, "/memfd:ckpt-memfd (deleted)");
        int seals = fcntl(mfd, F_GET_SEALS);
        if (seals != (F_SEAL_SHRINK | F_SEAL_GROW)) bad("memfd", "seals %#x", seals);
        if (lseek(mfd, 0, SEEK_CUR) != 123) bad("memfd", "offset %ld", (long)lseek(mfd, 0, SEEK_CUR));
        if (fstat(mfd, &st) || st.st_size != 64 * PG) bad("memfd", "size %ld", (long)st.st_size);
        if (!(fcntl(mfd, F_GETFD) & FD_CLOEXEC)) bad("memfd", "not close-on-exec");
        /* Page 1 is a hole: read by fd only (a read through the mapping would allocate it). */
        if (!same(mshared, 0, PG, msalt) || !same(mshared + 2 * PG, 2 * PG, PG, 1))
            bad("memfd", "bytes of the shared mapping");
        if (pread(mfd, buf, PG, PG) != PG || !zeros(buf, PG)) bad("memfd", "page 1 is not zeros");
        if (pread(mfd, buf, PG, 2 * PG) != PG || !same(buf, 2 * PG, PG, 1)) bad("memfd", "bytes read by fd");
        snprintf(want, sizeof want, "/proc/self/fd/%d", mfd);
        int again = open(want, O_RDONLY); /* its own offset: SEEK_DATA moves it */
        if (again < 0 || lseek(again, PG, SEEK_DATA) != 2 * PG || lseek(again, 4 * PG, SEEK_DATA) >= 0)
            bad("memfd", "holes: SEEK_DATA from page 1 gives %ld", (long)lseek(again, PG, SEEK_DATA));
        close(again);
        mshared[3 * PG] = 0x5a;
        if (pread(mfd, buf, 1, 3 * PG) != 1 || buf[0] != 0x5a) bad("memfd", "mapping and fd not the same object");
        if (!same(mpriv, 0, PG, psalt) || !same(mpriv + 2 * PG, 2 * PG, PG, 1)) bad("memfd", "private mapping bytes");
        mpriv[3 * PG] = 1;
        if (mshared[3 * PG] != 0x5a) bad("memfd", "private mapping writes through");
        mpriv[3 * PG] = 0x5a;
        if (!zeros(monly, PG) || !same(monly + PG, PG, PG, 2)) bad("memfd", "map-only memfd bytes");
        if (!still_shared(monly)) bad("memfd", "map-only memfd not shared");
        if (fcntl(mfd, F_ADD_SEALS, 0)) bad("memfd", "sealing no longer allowed: %s", strerror(errno));
    }
    if (gfd >= 0) {
        snprintf(want, sizeof want, "%s/ghost.bin (deleted)", dir);
        link_is("ghost", gfd, want);
        if (fstat(gfd, &st) || st.st_nlink != 0 || (st.st_mode & 07777) != 0640 || st.st_size != 2 * PG)
            bad("ghost", "nlink %ld mode %o size %ld", (long)st.st_nlink, st.st_mode & 07777, (long)st.st_size);
        if (lseek(gfd, 0, SEEK_CUR) != 77) bad("ghost", "offset %ld", (long)lseek(gfd, 0, SEEK_CUR));
        if (!same(gshared, 0, 2 * PG, 3) || !same(gpriv, 0, 2 * PG, 3)) bad("ghost", "mapped bytes");
        if (pread(gfd, buf, PG, PG) != PG || !same(buf, PG, PG, 3)) bad("ghost", "bytes read by fd");
        gshared[10] ^= 0xff;
        if (pread(gfd, buf, 16, 0) != 16 || buf[10] != gshared[10]) bad("ghost", "mapping and fd differ");
        gshared[10] ^= 0xff;
    }
    if (cwd0[0]) {
        char got[4096] = {0};
        if (readlink("/proc/self/cwd", got, sizeof got - 1) < 0 || strcmp(got, cwd0))
            bad("cwdgone", "cwd is %s, not %s", got, cwd0);
        if (open("x", O_WRONLY | O_CREAT, 0600) >= 0 || errno != ENOENT) bad("cwdgone", "a file could be made in it");
    }
    if (pfd >= 0) {
        snprintf(want, sizeof want, "/dev/shm%s", pshm_name);
        link_is("posixshm", pfd, want);
        if (!same(pshm, 0, 2 * PG, 4)) bad("posixshm", "bytes");
        pshm[7] ^= 0xff;
        if (pread(pfd, buf, 16, 0) != 16 || buf[7] != pshm[7]) bad("posixshm", "mapping and fd differ");
        pshm[7] ^= 0xff;
        if (!still_shared(pshm)) bad("posixshm", "not shared");
    }
    if (svid >= 0) {
        struct shmid_ds ds;
        if (shmctl(svid, IPC_STAT, &ds)) bad("sysv", "IPC_STAT on id %d: %s", svid, strerror(errno));
        else if (ds.shm_segsz != 3 * PG || ds.shm_nattch < 1 || (ds.shm_perm.mode & 0777) != 0640 ||
                 ds.shm_perm.__key != (key_t)(0x5ce00000 | (getpid() & 0xffff)))
            bad("sysv", "size %zu nattch %lu mode %o", ds.shm_segsz, (unsigned long)ds.shm_nattch, ds.shm_perm.mode);
        if (!same(sv, 0, PG, 5) || !zeros(sv + PG, PG) || !same(sv + 2 * PG, 2 * PG, PG, 5)) bad("sysv", "bytes");
        if (!still_shared(sv)) bad("sysv", "not shared");
    }
    if (svrmid >= 0) {
        struct shmid_ds ds;
        if (shmctl(svrmid, IPC_STAT, &ds)) bad("sysvrm", "IPC_STAT on id %d: %s", svrmid, strerror(errno));
        else if (!(ds.shm_perm.mode & SHM_DEST) || ds.shm_segsz != 2 * PG)
            bad("sysvrm", "mode %o size %zu", ds.shm_perm.mode, ds.shm_segsz);
        if (!same(svrm, 0, PG, 6) || !zeros(svrm + PG, PG)) bad("sysvrm", "bytes");
    }
    if (huge) {
        for (size_t off = 0; off < (4 << 20); off += 256 * PG)
            if (!same(huge + off, off, PG, 7)) { bad("hugeshm", "bytes at %zu", off); break; }
        if (!has_flag(huge, "hg")) bad("hugeshm", "no VmFlags hg");
        if (!still_shared(huge)) bad("hugeshm", "not shared");
    }
    if (opfd >= 0) {
        if (!(fcntl(opfd, F_GETFL) & O_PATH) || !(fcntl(lnfd, F_GETFL) & O_PATH)) bad("opath", "no O_PATH");
        if (fstatat(opfd, "", &st, AT_EMPTY_PATH) || !S_ISREG(st.st_mode)) bad("opath", "plain is not a file");
        if (fstatat(lnfd, "", &st, AT_EMPTY_PATH) || !S_ISLNK(st.st_mode)) bad("opath", "link is not a symlink");
        char got[64] = {0};
        if (readlinkat(lnfd, "", got, sizeof got - 1) < 0 || strcmp(got, "plain")) bad("opath", "link reads %s", got);
    }
    if (nsnet >= 0) {
        if (fstat(nsnet, &st) || st.st_ino != netino) bad("nsfd", "net ns inode %lu", (unsigned long)st.st_ino);
        if (fstat(nsuts, &st) || st.st_ino != utsino) bad("nsfd", "uts ns inode %lu", (unsigned long)st.st_ino);
    }
    if (l4 >= 0) {
        if (port_of(l4) != port4 || port_of(l6) != port6) bad("tcplisten", "ports %d %d", port_of(l4), port_of(l6));
        if (getopt_int(l4, SOL_SOCKET, SO_ACCEPTCONN) != 1 || getopt_int(l6, SOL_SOCKET, SO_ACCEPTCONN) != 1)
            bad("tcplisten", "not listening");
        if (getopt_int(l4, SOL_SOCKET, SO_REUSEADDR) != 1) bad("tcplisten", "SO_REUSEADDR lost");
        if (getopt_int(l4, IPPROTO_TCP, TCP_DEFER_ACCEPT) <= 0) bad("tcplisten", "TCP_DEFER_ACCEPT lost");
        if (getopt_int(l6, IPPROTO_IPV6, IPV6_V6ONLY) != 1) bad("tcplisten", "IPV6_V6ONLY lost");
        if (!(fcntl(l6, F_GETFL) & O_NONBLOCK) || (fcntl(l4, F_GETFL) & O_NONBLOCK)) bad("tcplisten", "O_NONBLOCK");
        if (!accepts(l4, AF_INET, port4)) bad("tcplisten", "no connection accepted on port %d", port4);
        if (!accepts(l6, AF_INET6, port6)) bad("tcplisten", "no connection accepted on port %d", port6);
    }
    if (ur >= 0) {
        struct sockaddr_in from, peer;
        socklen_t fl = sizeof from, pl = sizeof peer;
        char b[16] = {0};
        if (port_of(ur) != urport || port_of(uc) != ucport) bad("udp", "ports %d %d", port_of(ur), port_of(uc));
        if (getpeername(uc, (struct sockaddr *)&peer, &pl) || ntohs(peer.sin_port) != urport) bad("udp", "peer lost");
        if (!(fcntl(uc, F_GETFL) & O_NONBLOCK)) bad("udp", "O_NONBLOCK lost");
        if (send(uc, "dgram", 5, 0) != 5) bad("udp", "send: %s", strerror(errno));
        else if (recvfrom(ur, b, sizeof b, 0, (struct sockaddr *)&from, &fl) != 5 || strcmp(b, "dgram") ||
                 ntohs(from.sin_port) != ucport)
            bad("udp", "datagram %s from port %d", b, ntohs(from.sin_port));
    }
    (void)list;
    printf("%s\n", rlen ? report : "ok");
}

int main(int argc, char **argv) {
    const char *list = argc > 1 ? argv[1] : "";
    char line[256];
    dir = argc > 2 ? argv[2] : "/tmp";
    setup(list);
    printf("ready %d\n", getpid());
    fflush(stdout);
    setvbuf(stdout, NULL, _IONBF, 0);
    while (read_command(line, sizeof line)) {
        if (!strncmp(line, "check", 5)) {
            check(list);
        } else if (!strncmp(line, "write", 5)) {
            /* change every object after a dump, so that an incremental layer must carry it */
            if (mshared) { msalt = 11; psalt = 12; fill(mshared, 0, PG, msalt); fill(mpriv, 0, PG, psalt); }
            printf("written\n");
        } else if (!strncmp(line, "fdwrite", 7)) {
            /* through the fd, not the mapping: no dirty tracker sees it */
            printf("%s %p\n", pwrite(mfd, "fdwritten", 9, 3 * PG + 16) == 9 ? "written" : "failed", (void *)mshared);
        } else if (!strncmp(line, "udppend", 7)) {
            printf("%s\n", send(uc, "left", 4, 0) == 4 ? "sent" : "failed");
        } else if (!strncmp(line, "ports", 5)) {
            printf("%d %d\n", port4, port6);
        } else if (!strncmp(line, "exit", 4)) {
            if (pshm_name[0]) shm_unlink(pshm_name);
            exit(atoi(line + 5));
        } else {
            printf("unknown command\n");
        }
    }
    return 0;
}
