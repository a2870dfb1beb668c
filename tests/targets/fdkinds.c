/* A restore target holding fds of the kinds below and checking them itself, one switch per kind.
 *
 * usage: fdkinds LIST [DIR]
 * LIST is a comma-separated list of the switches below; DIR a directory of the test's, holding a
 * FIFO named "fifo" (made by the test) and the directories the inotify switch makes.
 * `check` looks at every fd the way the program would and answers one line: "ok" or "bad NAME:
 * what it found; ...". Checking leaves everything as it found it (bytes read are written back).
 * Between commands it blocks in read(0), so a dump finds it inside a syscall.
 *
 *   pipe     a pipe with both ends here: read end at fd 20 (O_NONBLOCK) and again at 22 (a dup: one
 *            open file description), write end at 21; pipe size 128 KiB; 5000 known bytes buffered.
 *            A second pipe with its ends crossed (write end 23 below read end 24, close-on-exec),
 *            empty, and a third whose ends sit at each other's first numbers (pipe2 gives 3,4:
 *            moved to 26 read, 25 write) holding 1 byte.
 *   bigpipe  a pipe of 1 MiB (fd 60 read, non-blocking; 61 write), full: 1 MiB of known bytes
 *   fifo     DIR/fifo opened read-only non-blocking at fd 30 and write-only at 31, 100 known bytes in it
 *   inherit  fd 3 is the write end of a pipe the test gave it: `check` writes "inherited PID\n" to it
 *   follow   fd 5 is a dup of fd 1 (a shell's `exec 5>&1`): the same open file
 *   follow2  fd 6 is a dup of fd 2 (a terminal, in the test: bash's fd 255)
 *   eventfd  fd 40: eventfd(7, EFD_SEMAPHORE|EFD_NONBLOCK), fd 41 a dup of it; fd 47 a plain eventfd
 *            holding 2^40 (above what eventfd2's initial value can give)
 *   timerfd  fd 42: CLOCK_MONOTONIC, 1000 s left, 3 s interval; fd 43: CLOCK_REALTIME with
 *            TFD_TIMER_ABSTIME at now + 2000 s, non-blocking; fd 44: expired once, not read (ticks 1)
 *   signalfd fd 45: SIGUSR1 and SIGUSR2 (blocked), SFD_NONBLOCK
 *   epoll    fd 46 watching fd 40 (EPOLLIN|EPOLLET, data 0x1122334455667788) and fd 44 (EPOLLIN,
 *            data 44): both ready; and the eventfd fd 47 for EPOLLOUT, data 47
 *   socket   socketpairs: SOCK_STREAM 50/51 with "hello" queued to 51; SOCK_DGRAM 52/53 with "one"
 *            and "two" queued to 53 (two messages); SOCK_SEQPACKET 54/55, empty, 55 non-blocking
 *   inotify  fd 56 watching DIR/b for IN_CREATE as watch 2 (a first watch, on DIR/a, was removed)
 *   epollgone epoll fd 49 watching an eventfd added as fd 48, which then moved to fd 57: refused
 *   inotifyq an inotify (fd 58) with an event not yet read: refused
 * Commands: `check`; `exit N`.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include "lineio.h"

static char report[4096];
static size_t rlen;

static void bad(const char *name, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    rlen += snprintf(report + rlen, sizeof report - rlen, "%sbad %s: ", rlen ? "; " : "", name);
    if (rlen < sizeof report) rlen += vsnprintf(report + rlen, sizeof report - rlen, fmt, ap);
    va_end(ap);
    if (rlen >= sizeof report) rlen = sizeof report - 1;
}

static int has(const char *list, const char *name) {
    size_t n = strlen(name);
    for (const char *p = list; (p = strstr(p, name)); p += n)
        if ((p == list || p[-1] == ',') && (p[n] == 0 || p[n] == ',')) return 1;
    return 0;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void move(int from, int to) {
    if (from == to) return;
    if (dup2(from, to) != to) die("dup2");
    close(from);
}

static unsigned char pattern(int i) { return (unsigned char)(i * 31 + i / 251); }

static void fill(int fd, int n) {
    unsigned char buf[8192];
    for (int i = 0; i < n; i++) buf[i] = pattern(i);
    if (write(fd, buf, n) != n) die("write");
}

#define BIG (1 << 20)

static void big_fill(int fd) {
    static unsigned char buf[BIG];
    for (int i = 0; i < BIG; i++) buf[i] = pattern(i);
    for (int done = 0; done < BIG;) {
        ssize_t n = write(fd, buf + done, BIG - done);
        if (n <= 0) die("write");
        done += n;
    }
}

static void big_check(void) {
    static unsigned char buf[BIG + 1];
    int got = 0;
    for (ssize_t n; (n = read(60, buf + got, sizeof buf - got)) > 0;) got += n;
    if (got != BIG) bad("bigpipe", "%d bytes buffered, not %d", got, BIG);
    for (int i = 0; i < got; i++)
        if (buf[i] != pattern(i)) {
            bad("bigpipe", "byte %d differs", i);
            break;
        }
    if (fcntl(61, F_GETPIPE_SZ) != BIG) bad("bigpipe", "size %d", fcntl(61, F_GETPIPE_SZ));
    big_fill(61);
}

static ino_t ino_of(int fd) {
    struct stat st;
    return fstat(fd, &st) ? 0 : st.st_ino;
}

/* Read everything buffered in `rfd` (non-blocking), compare with the pattern, write it back to `wfd`. */
static void check_bytes(const char *name, int rfd, int wfd, int n) {
    unsigned char buf[8192];
    int got = 0, fl = fcntl(rfd, F_GETFL);
    fcntl(rfd, F_SETFL, fl | O_NONBLOCK);
    for (;;) {
        ssize_t r = read(rfd, buf + got, sizeof buf - got);
        if (r <= 0) break;
        got += r;
    }
    fcntl(rfd, F_SETFL, fl);
    if (got != n) bad(name, "%d bytes buffered, not %d", got, n);
    for (int i = 0; i < got && i < n; i++)
        if (buf[i] != pattern(i)) {
            bad(name, "byte %d is %u, not %u", i, buf[i], pattern(i));
            break;
        }
    if (got && write(wfd, buf, got) != got) bad(name, "cannot write its bytes back");
}

static int same_file(int a, int b) { return syscall(SYS_kcmp, getpid(), getpid(), 0, a, b) == 0; }

static int64_t ns(clockid_t c) {
    struct timespec t;
    clock_gettime(c, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int64_t setup_mono, abs_deadline;
static char dir_b[4096];

static void setup(const char *list, const char *dir) {
    int p[2];
    char fifo[4096];
    snprintf(fifo, sizeof fifo, "%s/fifo", dir);
    if (has(list, "pipe")) {
        if (pipe(p)) die("pipe");
        move(p[0], 20);
        move(p[1], 21);
        if (fcntl(21, F_SETPIPE_SZ, 128 * 1024) < 0) die("F_SETPIPE_SZ");
        fcntl(20, F_SETFL, O_NONBLOCK);
        if (dup2(20, 22) != 22) die("dup2");
        fill(21, 5000);
        if (pipe(p)) die("pipe");
        move(p[1], 23);
        move(p[0], 24);
        fcntl(24, F_SETFD, FD_CLOEXEC); /* dup2 cleared it */
        if (pipe(p)) die("pipe");
        move(p[0], 26);
        move(p[1], 25);
        fill(25, 1);
    }
    if (has(list, "bigpipe")) {
        if (pipe(p)) die("pipe");
        move(p[0], 60);
        move(p[1], 61);
        if (fcntl(61, F_SETPIPE_SZ, BIG) != BIG) die("F_SETPIPE_SZ 1 MiB");
        fcntl(60, F_SETFL, O_NONBLOCK);
        big_fill(61);
    }
    if (has(list, "fifo")) {
        int r = open(fifo, O_RDONLY | O_NONBLOCK), w = open(fifo, O_WRONLY);
        if (r < 0 || w < 0) die("open fifo");
        move(r, 30);
        move(w, 31);
        fill(31, 100);
    }
    if (has(list, "follow") && dup2(1, 5) != 5) die("dup2");
    if (has(list, "follow2") && dup2(2, 6) != 6) die("dup2");
    if (has(list, "eventfd")) {
        move(eventfd(7, EFD_SEMAPHORE | EFD_NONBLOCK), 40);
        if (dup2(40, 41) != 41) die("dup2");
        move(eventfd(0, 0), 47);
        uint64_t v = 1ULL << 40;
        if (write(47, &v, 8) != 8) die("write eventfd");
    }
    if (has(list, "timerfd")) {
        struct itimerspec a = {{3, 0}, {1000, 0}}, b = {{0, 0}, {0, 0}}, c = {{0, 0}, {0, 1}};
        move(timerfd_create(CLOCK_MONOTONIC, 0), 42);
        setup_mono = ns(CLOCK_MONOTONIC);
        if (timerfd_settime(42, 0, &a, NULL)) die("timerfd_settime");
        move(timerfd_create(CLOCK_REALTIME, TFD_NONBLOCK), 43);
        abs_deadline = ns(CLOCK_REALTIME) + 2000000000000LL;
        b.it_value.tv_sec = abs_deadline / 1000000000LL;
        b.it_value.tv_nsec = abs_deadline % 1000000000LL;
        if (timerfd_settime(43, TFD_TIMER_ABSTIME, &b, NULL)) die("timerfd_settime");
        move(timerfd_create(CLOCK_MONOTONIC, 0), 44);
        if (timerfd_settime(44, 0, &c, NULL)) die("timerfd_settime");
        struct pollfd pf = {44, POLLIN, 0};
        if (poll(&pf, 1, -1) != 1) die("poll"); /* it expired: 1 tick, not read */
    }
    if (has(list, "signalfd")) {
        sigset_t m;
        sigemptyset(&m);
        sigaddset(&m, SIGUSR1);
        sigaddset(&m, SIGUSR2);
        sigprocmask(SIG_BLOCK, &m, NULL);
        move(signalfd(-1, &m, SFD_NONBLOCK), 45);
    }
    if (has(list, "epoll")) {
        struct epoll_event e1 = {EPOLLIN | EPOLLET, {.u64 = 0x1122334455667788ULL}}, e2 = {EPOLLIN, {.u64 = 44}},
                           e3 = {EPOLLOUT, {.u64 = 47}};
        move(epoll_create1(0), 46);
        if (epoll_ctl(46, EPOLL_CTL_ADD, 40, &e1) || epoll_ctl(46, EPOLL_CTL_ADD, 44, &e2) ||
            epoll_ctl(46, EPOLL_CTL_ADD, 47, &e3))
            die("epoll_ctl");
    }
    if (has(list, "socket")) {
        int s[2];
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, s)) die("socketpair");
        move(s[0], 50);
        move(s[1], 51);
        if (send(50, "hello", 5, 0) != 5) die("send");
        if (socketpair(AF_UNIX, SOCK_DGRAM, 0, s)) die("socketpair");
        move(s[0], 52);
        move(s[1], 53);
        if (send(52, "one", 3, 0) != 3 || send(52, "two", 3, 0) != 3) die("send");
        if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, s)) die("socketpair");
        move(s[0], 54);
        move(s[1], 55);
        fcntl(55, F_SETFL, O_NONBLOCK);
    }
    if (has(list, "inotify")) {
        char a[4096];
        snprintf(a, sizeof a, "%s/a", dir);
        snprintf(dir_b, sizeof dir_b, "%s/b", dir);
        mkdir(a, 0700);
        mkdir(dir_b, 0700);
        move(inotify_init1(0), 56);
        int w1 = inotify_add_watch(56, a, IN_CREATE), w2 = inotify_add_watch(56, dir_b, IN_CREATE);
        if (w1 != 1 || w2 != 2 || inotify_rm_watch(56, w1)) die("inotify");
        char buf[4096];
        fcntl(56, F_SETFL, O_NONBLOCK);
        while (read(56, buf, sizeof buf) > 0) {} /* the IN_IGNORED of the removal */
        fcntl(56, F_SETFL, 0);
    }
}

static void setup_refused(const char *list, const char *dir) {
    if (has(list, "epollgone")) {
        struct epoll_event e = {EPOLLIN, {.u64 = 1}};
        move(eventfd(0, 0), 48);
        move(epoll_create1(0), 49);
        if (epoll_ctl(49, EPOLL_CTL_ADD, 48, &e)) die("epoll_ctl");
        move(48, 57);
    }
    if (has(list, "inotifyq")) {
        char p[4096];
        snprintf(p, sizeof p, "%s/q", dir);
        move(inotify_init1(0), 58);
        if (inotify_add_watch(58, dir, IN_CREATE) < 0) die("inotify_add_watch");
        close(open(p, O_CREAT | O_WRONLY, 0600));
    }
}

static int type_of(int fd) {
    int t = -1;
    socklen_t l = sizeof t;
    getsockopt(fd, SOL_SOCKET, SO_TYPE, &t, &l);
    return t;
}

/* Every message queued to `fd`, compared with `want` (NULL-terminated), then sent again from `peer`. */
static void check_queue(int fd, int peer, const char **want) {
    char got[8][64];
    int n = 0;
    for (; n < 8; n++) {
        ssize_t r = recv(fd, got[n], sizeof got[n] - 1, MSG_DONTWAIT);
        if (r < 0) break;
        got[n][r] = 0;
    }
    int i = 0;
    for (; want[i]; i++)
        if (i >= n || strcmp(got[i], want[i])) {
            bad("socket", "fd %d: message %d is \"%s\", not \"%s\"", fd, i, i < n ? got[i] : "(none)", want[i]);
            break;
        }
    if (n != i && !rlen) bad("socket", "fd %d: %d messages, not %d", fd, n, i);
    for (int j = 0; j < n; j++) send(peer, got[j], strlen(got[j]), 0);
}

static void check(const char *list, const char *dir) {
    char fifo[4096];
    snprintf(fifo, sizeof fifo, "%s/fifo", dir);
    rlen = 0;
    report[0] = 0;
    if (has(list, "pipe")) {
        ino_t i = ino_of(20);
        if (!i || ino_of(21) != i || ino_of(22) != i) bad("pipe", "fds 20, 21, 22 are not one pipe");
        if ((fcntl(20, F_GETFL) & O_ACCMODE) != O_RDONLY || (fcntl(21, F_GETFL) & O_ACCMODE) != O_WRONLY)
            bad("pipe", "ends swapped");
        if (!(fcntl(20, F_GETFL) & O_NONBLOCK) || (fcntl(21, F_GETFL) & O_NONBLOCK))
            bad("pipe", "O_NONBLOCK is %d on the read end, %d on the write end",
                !!(fcntl(20, F_GETFL) & O_NONBLOCK), !!(fcntl(21, F_GETFL) & O_NONBLOCK));
        fcntl(22, F_SETFL, 0); /* one description: fd 20 sees the change */
        if (fcntl(20, F_GETFL) & O_NONBLOCK) bad("pipe", "fds 20 and 22 are not one open file");
        fcntl(22, F_SETFL, O_NONBLOCK);
        if (fcntl(21, F_GETPIPE_SZ) != 128 * 1024) bad("pipe", "size %d", fcntl(21, F_GETPIPE_SZ));
        check_bytes("pipe", 20, 21, 5000);
        if (!ino_of(23) || ino_of(23) != ino_of(24)) bad("pipe", "fds 23, 24 are not one pipe");
        if ((fcntl(23, F_GETFL) & O_ACCMODE) != O_WRONLY) bad("pipe", "fd 23 is not a write end");
        if (fcntl(23, F_GETFD) != 0 || fcntl(24, F_GETFD) != FD_CLOEXEC) bad("pipe", "close-on-exec of 23/24");
        check_bytes("pipe", 24, 23, 0);
        if (!ino_of(25) || ino_of(25) != ino_of(26)) bad("pipe", "fds 25, 26 are not one pipe");
        if ((fcntl(26, F_GETFL) & O_ACCMODE) != O_RDONLY) bad("pipe", "fd 26 is not a read end");
        check_bytes("pipe", 26, 25, 1);
    }
    if (has(list, "bigpipe")) big_check();
    if (has(list, "fifo")) {
        struct stat st;
        if (stat(fifo, &st) || st.st_ino != ino_of(30) || ino_of(31) != st.st_ino) bad("fifo", "fds 30, 31 are not the FIFO");
        if (!(fcntl(30, F_GETFL) & O_NONBLOCK) || (fcntl(31, F_GETFL) & O_ACCMODE) != O_WRONLY) bad("fifo", "flags");
        check_bytes("fifo", 30, 31, 100);
    }
    if (has(list, "inherit")) {
        char msg[64];
        int n = snprintf(msg, sizeof msg, "inherited %d\n", getpid());
        if (write(3, msg, n) != n) bad("inherit", "write to fd 3: %s", strerror(errno));
    }
    if (has(list, "follow") && (!ino_of(5) || ino_of(5) != ino_of(1))) bad("follow", "fd 5 is not fd 1's file");
    if (has(list, "follow2") && (!ino_of(6) || !same_file(6, 2))) bad("follow2", "fd 6 is not fd 2");
    if (has(list, "eventfd")) {
        uint64_t v = 0;
        int n = 0;
        if (!same_file(40, 41)) bad("eventfd", "fd 41 is not fd 40");
        if (!(fcntl(40, F_GETFL) & O_NONBLOCK)) bad("eventfd", "not non-blocking");
        while (read(40, &v, 8) == 8 && n < 100) {
            if (v != 1) bad("eventfd", "a semaphore read gave %llu", (unsigned long long)v);
            n++;
        }
        if (n != 7) bad("eventfd", "count %d, not 7", n);
        v = n;
        if (n && write(41, &v, 8) != 8) bad("eventfd", "cannot write the count back");
        struct pollfd pf = {47, POLLIN, 0};
        if (poll(&pf, 1, 0) != 1 || read(47, &v, 8) != 8 || v != 1ULL << 40)
            bad("eventfd", "fd 47 holds %llu, not 2^40", (unsigned long long)v);
        else if (write(47, &v, 8) != 8) bad("eventfd", "cannot write fd 47's count back");
    }
    if (has(list, "timerfd")) {
        struct itimerspec t;
        if (timerfd_gettime(42, &t)) bad("timerfd", "fd 42: %s", strerror(errno));
        int64_t left = t.it_value.tv_sec * 1000000000LL + t.it_value.tv_nsec;
        int64_t since = ns(CLOCK_MONOTONIC) - setup_mono;
        if (t.it_interval.tv_sec != 3 || t.it_interval.tv_nsec) bad("timerfd", "fd 42's interval changed");
        /* Never later than set, never earlier than the original would have fired (a restore may
           add the time the process was away, not take any). */
        if (left > 1000000000000LL || left + since < 1000000000000LL - 1000000000LL)
            bad("timerfd", "fd 42 has %lld ns left, %lld ns after it was set", (long long)left, (long long)since);
        if (timerfd_gettime(43, &t)) bad("timerfd", "fd 43: %s", strerror(errno));
        int64_t at = ns(CLOCK_REALTIME) + t.it_value.tv_sec * 1000000000LL + t.it_value.tv_nsec;
        if (at > abs_deadline + 1000000000LL || at < abs_deadline - 1000000000LL)
            bad("timerfd", "fd 43 fires %lld ns off its deadline", (long long)(at - abs_deadline));
        if (!(fcntl(43, F_GETFL) & O_NONBLOCK)) bad("timerfd", "fd 43 is not non-blocking");
        struct pollfd pf = {44, POLLIN, 0};
        if (poll(&pf, 1, 0) != 1) bad("timerfd", "fd 44's expiration was lost");
    }
    if (has(list, "signalfd")) {
        struct signalfd_siginfo si;
        if (!(fcntl(45, F_GETFL) & O_NONBLOCK)) bad("signalfd", "not non-blocking");
        if (read(45, &si, sizeof si) != -1 || errno != EAGAIN) bad("signalfd", "a signal was pending");
        int sigs[2] = {SIGUSR1, SIGUSR2};
        for (int i = 0; i < 2; i++) {
            raise(sigs[i]);
            if (read(45, &si, sizeof si) != sizeof si || (int)si.ssi_signo != sigs[i])
                bad("signalfd", "signal %d not read from it", sigs[i]);
        }
    }
    if (has(list, "epoll")) {
        struct epoll_event ev[8];
        int n = epoll_wait(46, ev, 8, 0), seen = 0;
        for (int i = 0; i < n; i++) {
            if (ev[i].data.u64 == 0x1122334455667788ULL && (ev[i].events & EPOLLIN)) seen |= 1;
            else if (ev[i].data.u64 == 44 && (ev[i].events & EPOLLIN)) seen |= 2;
            else if (ev[i].data.u64 == 47 && (ev[i].events & EPOLLOUT)) seen |= 4;
            else bad("epoll", "event %x with data %llx", ev[i].events, (unsigned long long)ev[i].data.u64);
        }
        if (seen != 7) bad("epoll", "%d events, seen %d", n, seen);
        struct epoll_event e1 = {EPOLLIN | EPOLLET, {.u64 = 0x1122334455667788ULL}};
        if (epoll_ctl(46, EPOLL_CTL_MOD, 40, &e1)) bad("epoll", "fd 40 is not watched under its number: %s", strerror(errno));
    }
    if (has(list, "socket")) {
        const char *hello[] = {"hello", NULL}, *dgrams[] = {"one", "two", NULL}, *none[] = {NULL};
        if (type_of(50) != SOCK_STREAM || type_of(52) != SOCK_DGRAM || type_of(54) != SOCK_SEQPACKET)
            bad("socket", "types %d %d %d", type_of(50), type_of(52), type_of(54));
        check_queue(51, 50, hello);
        check_queue(50, 51, none);
        check_queue(53, 52, dgrams);
        check_queue(54, 55, none);
        if (!(fcntl(55, F_GETFL) & O_NONBLOCK) || (fcntl(54, F_GETFL) & O_NONBLOCK)) bad("socket", "flags of 54/55");
        char b[8];
        if (send(54, "x", 1, 0) != 1 || recv(55, b, sizeof b, 0) != 1) bad("socket", "54 and 55 are not a pair");
    }
    if (has(list, "inotify")) {
        char path[4096 + 8], buf[4096];
        snprintf(path, sizeof path, "%s/x", dir_b);
        int fd = open(path, O_CREAT | O_WRONLY, 0600);
        close(fd);
        unlink(path);
        struct pollfd pf = {56, POLLIN, 0};
        ssize_t n = poll(&pf, 1, 0) == 1 ? read(56, buf, sizeof buf) : -1;
        struct inotify_event *e = (struct inotify_event *)buf;
        if (n < (ssize_t)sizeof *e || e->wd != 2 || !(e->mask & IN_CREATE) || strcmp(e->name, "x"))
            bad("inotify", "no IN_CREATE of x from watch 2 (read %zd, wd %d)", n, n > 0 ? e->wd : -1);
        else if (n != (ssize_t)(sizeof *e + e->len)) bad("inotify", "%zd bytes of events", n);
    }
    printf("%s\n", rlen ? report : "ok");
}

int main(int argc, char **argv) {
    const char *list = argc > 1 ? argv[1] : "";
    const char *fifo = argc > 2 ? argv[2] : ".";
    char line[256];
    setup(list, fifo);
    setup_refused(list, fifo);
    printf("ready %d\n", getpid());
    fflush(stdout);
    setvbuf(stdout, NULL, _IONBF, 0);
    while (read_command(line, sizeof line)) {
        if (!strncmp(line, "check", 5))
            check(list, fifo);
        else if (!strncmp(line, "exit", 4))
            exit(atoi(line + 5));
        else
            printf("unknown command\n");
    }
    return 0;
}
