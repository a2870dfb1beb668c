/* An established TCP connection kept at fd 7 (O_NONBLOCK, not close-on-exec) across a dump and
 * restore: ckpt dump --tcp-established (tests/test_restore_tcp.py).
 *
 * Usage: tcpconn HOST PORT. Connects to the test's peer and says "ready LOCALPORT". Both directions
 * carry a known stream: byte i from us is (i * 7 + 3) & 255, byte i from the peer (i * 13 + 5) & 255,
 * so that every byte after a restore is checked against its place in the stream.
 *
 * Commands (one line each on stdin, one answer line on stdout):
 *   send N     write up to N stream bytes without blocking; "sent K" (stops when the socket is full)
 *   sendall N  write N stream bytes, waiting for room; "sent N"
 *   recv N     read N bytes, waiting for them; "ok" if each is the peer's byte at its place, else
 *              "bad at OFFSET"
 *   waitin N   wait until N bytes are queued to read (SO_RCVLOWAT + poll); "inq N"
 *   queues     "inq A outq B unsent C" (SIOCINQ, SIOCOUTQ, SIOCOUTQNSD)
 *   fdinfo     "fd 7 nonblock X cloexec Y state S" (S: TCP_INFO's tcpi_state, 1 = established)
 *   unbound    open a TCP socket never bound nor connected (restore refuses it); "fd N"
 *   close      close fd 7 (a process like this one without its connection: bench_tcp_migrate.py)
 *   dup        fd 9 made a dup of fd 7; "fd 9"
 *   same       "same 1" if fds 7 and 9 are the same socket (inode), else "same 0"
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/sockios.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lineio.h"

#define FD 7

static unsigned long long sent_total, recv_total;
static unsigned char buf[1 << 16];

static void say(const char *fmt, unsigned long long a, unsigned long long b, unsigned long long c) {
    char out[256];
    int n = snprintf(out, sizeof out, fmt, a, b, c);
    if (write(1, out, n) != n) _exit(3);
}

static unsigned long long do_send(unsigned long long n, int wait) {
    unsigned long long done = 0;
    while (done < n) {
        size_t chunk = n - done < sizeof buf ? n - done : sizeof buf;
        for (size_t i = 0; i < chunk; i++) buf[i] = (unsigned char)((sent_total + i) * 7 + 3);
        ssize_t w = write(FD, buf, chunk);
        if (w < 0 && errno == EAGAIN) {
            if (!wait) break;
            struct pollfd p = {FD, POLLOUT, 0};
            poll(&p, 1, -1);
            continue;
        }
        if (w < 0) {
            perror("write");
            exit(2);
        }
        sent_total += w;
        done += w;
    }
    return done;
}

static void do_recv(unsigned long long n) {
    unsigned long long done = 0, bad = ~0ULL;
    while (done < n) {
        size_t chunk = n - done < sizeof buf ? n - done : sizeof buf;
        ssize_t r = read(FD, buf, chunk);
        if (r < 0 && errno == EAGAIN) {
            struct pollfd p = {FD, POLLIN, 0};
            poll(&p, 1, -1);
            continue;
        }
        if (r <= 0) {
            say("eof after %llu\n", done, 0, 0);
            return;
        }
        for (ssize_t i = 0; i < r; i++)
            if (bad == ~0ULL && buf[i] != (unsigned char)((recv_total + i) * 13 + 5)) bad = recv_total + i;
        recv_total += r;
        done += r;
    }
    if (bad == ~0ULL)
        say("ok\n", 0, 0, 0);
    else
        say("bad at %llu\n", bad, 0, 0);
}

int main(int argc, char **argv) {
    if (argc != 3) return 1;
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai;
    if (getaddrinfo(argv[1], argv[2], &hints, &ai)) return 1;
    int s = socket(ai->ai_family, SOCK_STREAM, 0);
    if (s < 0 || connect(s, ai->ai_addr, ai->ai_addrlen)) {
        perror("connect");
        return 1;
    }
    if (dup2(s, FD) != FD) return 1;
    close(s);
    fcntl(FD, F_SETFL, O_NONBLOCK);
    struct sockaddr_storage me;
    socklen_t len = sizeof me;
    getsockname(FD, (struct sockaddr *)&me, &len);
    unsigned port = ntohs(((struct sockaddr_in *)&me)->sin_port);  /* same place in sockaddr_in6 */
    say("ready %llu\n", port, 0, 0);
    char ln[256];
    while (read_command(ln, sizeof ln) > 0) {
        unsigned long long n = 0;
        if (sscanf(ln, "send %llu", &n) == 1) {
            say("sent %llu\n", do_send(n, 0), 0, 0);
        } else if (sscanf(ln, "sendall %llu", &n) == 1) {
            say("sent %llu\n", do_send(n, 1), 0, 0);
        } else if (sscanf(ln, "recv %llu", &n) == 1) {
            do_recv(n);
        } else if (sscanf(ln, "waitin %llu", &n) == 1) {
            int low = (int)n, one = 1, inq = 0;
            setsockopt(FD, SOL_SOCKET, SO_RCVLOWAT, &low, sizeof low);
            struct pollfd p = {FD, POLLIN, 0};
            poll(&p, 1, -1);
            setsockopt(FD, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof one);
            ioctl(FD, SIOCINQ, &inq);
            say("inq %llu\n", inq, 0, 0);
        } else if (strncmp(ln, "queues", 6) == 0) {
            int inq = 0, outq = 0, nsd = 0;
            ioctl(FD, SIOCINQ, &inq);
            ioctl(FD, SIOCOUTQ, &outq);
            ioctl(FD, SIOCOUTQNSD, &nsd);
            say("inq %llu outq %llu unsent %llu\n", inq, outq, nsd);
        } else if (strncmp(ln, "fdinfo", 6) == 0) {
            struct tcp_info ti;
            socklen_t tl = sizeof ti;
            memset(&ti, 0, sizeof ti);
            getsockopt(FD, IPPROTO_TCP, TCP_INFO, &ti, &tl);
            int fl = fcntl(FD, F_GETFL), fdf = fcntl(FD, F_GETFD);
            char out[128];
            int k = snprintf(out, sizeof out, "fd %d nonblock %d cloexec %d state %d\n", FD,
                             !!(fl & O_NONBLOCK), !!(fdf & FD_CLOEXEC), ti.tcpi_state);
            if (write(1, out, k) != k) return 3;
        } else if (strncmp(ln, "dup", 3) == 0) {
            say("fd %llu\n", dup2(FD, 9), 0, 0);
        } else if (strncmp(ln, "same", 4) == 0) {
            struct stat a, b;
            say("same %llu\n", !fstat(FD, &a) && !fstat(9, &b) && a.st_ino == b.st_ino, 0, 0);
        } else if (strncmp(ln, "close", 5) == 0) {
            say("closed %llu\n", close(FD) == 0, 0, 0);
        } else if (strncmp(ln, "unbound", 7) == 0) {
            say("fd %llu\n", socket(AF_INET, SOCK_STREAM, 0), 0, 0);
        } else {
            say("?\n", 0, 0, 0);
        }
    }
    return 0;
}
