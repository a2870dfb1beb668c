/* Threads idle in read(), and handlers that count the "ignore by default" signals a freeze's batch
 * may end its runs with (ckpt/ptrace/batch.py quiet_signals).
 *
 *   quietends NTHREADS CATCH IGNORE
 * CATCH: comma-separated names among urg, winch, chld (or "-"): those get a counting handler.
 * IGNORE: a signal number set to SIG_IGN (0: none). Every thread leaves its mask empty.
 * Prints "ready PID" once the NTHREADS-1 other threads are in read() on a pipe nobody writes.
 * Commands (stdin): count -> "urg N winch N chld N"; exit -> exit(0).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lineio.h"

static volatile int counts[65];
static int pfd[2];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int started;

static void on_sig(int sig) { __atomic_add_fetch(&counts[sig], 1, __ATOMIC_SEQ_CST); }

static void *idle(void *arg) {
    (void)arg;
    pthread_mutex_lock(&lock);
    started++;
    pthread_cond_signal(&cond);
    pthread_mutex_unlock(&lock);
    char c;
    for (;;) if (read(pfd[0], &c, 1) <= 0) pause();
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: quietends NTHREADS CATCH IGNORE\n"); return 2; }
    setvbuf(stdout, NULL, _IOLBF, 0);
    int n = atoi(argv[1]);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sig;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (strstr(argv[2], "urg")) sigaction(SIGURG, &sa, NULL);
    if (strstr(argv[2], "winch")) sigaction(SIGWINCH, &sa, NULL);
    if (strstr(argv[2], "chld")) sigaction(SIGCHLD, &sa, NULL);
    int ign = atoi(argv[3]);
    if (ign > 0) signal(ign, SIG_IGN);
    if (pipe(pfd)) { perror("pipe"); return 1; }
    for (int i = 1; i < n; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, idle, NULL)) { perror("pthread_create"); return 1; }
    }
    pthread_mutex_lock(&lock);
    while (started < n - 1) pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
    printf("ready %d\n", getpid());
    char line[64];
    for (;;) {
        if (!read_command(line, sizeof line)) return 0;
        if (!strncmp(line, "count", 5))
            printf("urg %d winch %d chld %d\n", counts[SIGURG], counts[SIGWINCH], counts[SIGCHLD]);
        else if (!strncmp(line, "exit", 4))
            return 0;
    }
}
