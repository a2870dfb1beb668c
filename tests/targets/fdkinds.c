/* A restore target holding fds of the kinds below and checking them itself, one switch per kind.
 *
 * usage: fdkinds LIST [FIFO]
 * LIST is a comma-separated list of the switches below; FIFO is the path of a FIFO the test made.
 * `check` looks at every fd the way the program would and answers one line: "ok" or "bad NAME:
 * what it found; ...". Checking leaves everything as it found it (bytes read are written back).
 * Between commands it blocks in read(0), so a dump finds it inside a syscall.
 *
 *   pipe     a pipe with both ends here: read end at fd 20 (O_NONBLOCK) and again at 22 (a dup: one
 *            open file description), write end at 21; pipe size 128 KiB; 5000 known bytes buffered.
 *            A second pipe with its ends crossed (write end 23 below read end 24, close-on-exec),
 *            empty, and a third whose ends sit at each other's first numbers (pipe2 gives 3,4:
 *            moved to 26 read, 25 write) holding 1 byte.
 *   fifo     FIFO opened read-only non-blocking at fd 30 and write-only at 31, 100 known bytes in it
 *   inherit  fd 3 is the write end of a pipe the test gave it: `check` writes "inherited PID\n" to it
 *   follow   fd 5 is a dup of fd 1 (a shell's `exec 5>&1`): the same open file
 * Commands: `check`; `exit N`.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
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

static void setup(const char *list, const char *fifo) {
    int p[2];
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
    if (has(list, "fifo")) {
        int r = open(fifo, O_RDONLY | O_NONBLOCK), w = open(fifo, O_WRONLY);
        if (r < 0 || w < 0) die("open fifo");
        move(r, 30);
        move(w, 31);
        fill(31, 100);
    }
    if (has(list, "follow") && dup2(1, 5) != 5) die("dup2");
}

static void check(const char *list, const char *fifo) {
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
    printf("%s\n", rlen ? report : "ok");
}

int main(int argc, char **argv) {
    const char *list = argc > 1 ? argv[1] : "";
    const char *fifo = argc > 2 ? argv[2] : "";
    char line[256];
    setup(list, fifo);
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
