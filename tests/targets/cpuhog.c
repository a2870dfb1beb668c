/* A CPU-bound target for the --auto-converge throttle: a second thread spins all the time, and the
 * main thread burns CPU on request, so a CPU quota has something to hold back.
 *
 * usage: cpuhog
 * Commands (one line each, one line of answer):
 *   burn MS -> spin until the main thread has used MS ms more of its own CPU time -> "burnt MS"
 *   fork    -> fork a child that waits in pause() (it is in whatever cgroup the process is) -> "child PID"
 *   exit N  -> exit(N)
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include "lineio.h"

static volatile unsigned long spins;

static void *spin(void *arg) {
    (void)arg;
    for (;;) spins++;
    return NULL;
}

static double thread_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

int main(void) {
    pthread_t th;
    if (pthread_create(&th, NULL, spin, NULL) != 0) return 1;
    printf("ready %d\n", getpid());
    fflush(stdout);
    char line[128];
    while (read_command(line, sizeof line) > 0) {
        long n = 0;
        if (sscanf(line, "burn %ld", &n) == 1) {
            double end = thread_ms() + n;
            while (thread_ms() < end) spins++;
            printf("burnt %ld\n", n);
        } else if (strcmp(line, "fork\n") == 0) {
            pid_t c = fork();
            if (c == 0) {
                prctl(PR_SET_PDEATHSIG, SIGKILL);
                for (;;) pause();
            }
            printf("child %d\n", (int)c);
        } else if (sscanf(line, "exit %ld", &n) == 1) {
            exit((int)n);
        } else {
            printf("unknown\n");
        }
        fflush(stdout);
    }
    return 0;
}
