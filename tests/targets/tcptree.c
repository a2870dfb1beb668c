/* A process tree holding established TCP connections (tests/test_tree_tcp.py): a connection between
 * its two processes (both ends inside the tree) and one from the child to the test's peer.
 *
 * Usage: tcptree HOST PORT. The parent listens on 127.0.0.1, forks, accepts the child's connection
 * at its fd 8 and closes the listener; the child connects to it (its fd 8) and to the test's peer
 * (its fd 7), and is an echo server on both: whatever arrives on a connection goes back on it.
 * The parent says "ready CHILDPID" once both connections are up. The child ends when the parent's
 * end closes.
 *
 * Parent commands (one line on stdin, one answer line on stdout):
 *   stuff N    write N bytes of its stream to the child without reading the echo (it is left
 *              queued in the parent's receive queue, and in flight); "stuffed N"
 *   drain N    read N echoed bytes; "ok" if each is the stream's byte at its place, else "bad at K"
 *   ping N     stuff N, then drain N
 * The parent's stream: byte i is (i * 11 + 1) & 255.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "lineio.h"

static unsigned long long stuffed, drained;
static unsigned char buf[1 << 16];

static void say(const char *fmt, unsigned long long a) {
    char out[128];
    int n = snprintf(out, sizeof out, fmt, a);
    if (write(1, out, n) != n) _exit(3);
}

static void write_all(int fd, const unsigned char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) _exit(4);
        p += w;
        n -= w;
    }
}

static void child(int port, const char *host, const char *peer_port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(s, (struct sockaddr *)&a, sizeof a) || dup2(s, 8) != 8) _exit(5);
    close(s);
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai;
    if (getaddrinfo(host, peer_port, &hints, &ai)) _exit(6);
    s = socket(ai->ai_family, SOCK_STREAM, 0);
    if (connect(s, ai->ai_addr, ai->ai_addrlen) || dup2(s, 7) != 7) _exit(7);
    close(s);
    write_all(8, (const unsigned char *)"!", 1); /* both connections are up */
    struct pollfd p[2] = {{7, POLLIN, 0}, {8, POLLIN, 0}};
    for (;;) {
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR) continue;
            _exit(8);
        }
        for (int i = 0; i < 2; i++) {
            if (!(p[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            ssize_t r = read(p[i].fd, buf, sizeof buf);
            if (r < 0 && (errno == EINTR || errno == EAGAIN)) continue;
            if (r <= 0) _exit(0);
            write_all(p[i].fd, buf, r);
        }
    }
}

static void stuff(unsigned long long n) {
    while (n) {
        size_t k = n < sizeof buf ? n : sizeof buf;
        for (size_t i = 0; i < k; i++) buf[i] = (unsigned char)((stuffed + i) * 11 + 1);
        write_all(8, buf, k);
        stuffed += k;
        n -= k;
    }
}

static void drain(unsigned long long n) {
    unsigned long long bad = ~0ULL;
    while (n) {
        ssize_t r = read(8, buf, n < sizeof buf ? n : sizeof buf);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            say("eof at %llu\n", drained);
            return;
        }
        for (ssize_t i = 0; i < r; i++)
            if (bad == ~0ULL && buf[i] != (unsigned char)((drained + i) * 11 + 1)) bad = drained + i;
        drained += r;
        n -= r;
    }
    if (bad == ~0ULL)
        say("ok\n", 0);
    else
        say("bad at %llu\n", bad);
}

int main(int argc, char **argv) {
    if (argc != 3) return 1;
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 1) || getsockname(l, (struct sockaddr *)&a, &len))
        return 1;
    pid_t pid = fork();
    if (pid == 0) {
        close(l);
        child(ntohs(a.sin_port), argv[1], argv[2]);
    }
    int c = accept(l, NULL, NULL);
    if (c < 0 || dup2(c, 8) != 8) return 1;
    close(c);
    close(l);
    char hello;
    if (read(8, &hello, 1) != 1) return 1;
    say("ready %llu\n", (unsigned long long)pid);
    char ln[256];
    while (read_command(ln, sizeof ln) > 0) {
        unsigned long long n = 0;
        if (sscanf(ln, "stuff %llu", &n) == 1) {
            stuff(n);
            say("stuffed %llu\n", n);
        } else if (sscanf(ln, "drain %llu", &n) == 1) {
            drain(n);
        } else if (sscanf(ln, "ping %llu", &n) == 1) {
            stuff(n);
            drain(n);
        } else {
            say("?\n", 0);
        }
    }
    return 0;
}
