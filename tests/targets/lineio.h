/* The command reader of the test targets.
 *
 * One line from fd 0 with read(2), a byte at a time, so that nothing is ever buffered inside stdio:
 * between two commands the calling thread is always blocked in read(), which is what the tests
 * check a dump against. Returns the line's length (the newline kept, NUL-terminated), 0 at EOF. */
#ifndef CKPT_TEST_LINEIO_H
#define CKPT_TEST_LINEIO_H
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

static inline size_t read_command(char *line, size_t size) {
    size_t n = 0;
    while (n + 1 < size) {
        if (read(0, line + n, 1) <= 0) break;
        if (line[n++] == '\n') break;
    }
    line[n] = 0;
    return n;
}

/* One line as read_command reads it, but a read that returns no byte is counted in *early (the
 * early returns the tests look for: a blocked read() must never end without input) and the read
 * goes on; 0 only at EOF. The newline is dropped; a line longer than size is cut. */
static inline size_t read_command_counted(char *line, size_t size, volatile long *early) {
    size_t n = 0;
    for (;;) {
        long r = read(0, line + n, 1);
        if (r != 1) {
            __atomic_add_fetch(early, 1, __ATOMIC_SEQ_CST);
            if (r == 0) return 0;
            continue;
        }
        if (line[n] == '\n' || n + 2 >= size) break;
        n++;
    }
    line[n] = 0;
    return n + 1;
}

/* A signal's disposition as a target's argument names it: "dfl" (left as it is), "handler" (the
 * SA_SIGINFO handler given, SA_RESTART), "ignore" (SIG_IGN). "block" is the caller's to do, in
 * the threads it chooses (block_signal). */
static inline void set_disposition(int sig, const char *mode, void (*handler)(int, siginfo_t *, void *)) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    if (!strcmp(mode, "handler")) {
        sa.sa_sigaction = handler;
        sa.sa_flags = SA_SIGINFO | SA_RESTART;
        sigaction(sig, &sa, NULL);
    } else if (!strcmp(mode, "ignore")) {
        sa.sa_handler = SIG_IGN;
        sigaction(sig, &sa, NULL);
    }
}

/* sig blocked in the calling thread. */
static inline void block_signal(int sig) {
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, sig);
    pthread_sigmask(SIG_BLOCK, &m, NULL);
}
#endif
