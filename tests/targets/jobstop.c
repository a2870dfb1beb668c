/* A target in a job-control stop (tests/test_jobstop.py): it stops itself with the signal asked for,
 * counts the SIGCONTs it is sent (a handler), and answers over its pipes once it runs again.
 *
 * argv[1]: a number it keeps in memory, answered by "ping" (the restored process is this one).
 * Commands (one line each on stdin, answers on stdout):
 *   stop SIG     "stopping", then raise(SIG); continued: "resumed conts N value V"
 *   ping         "pong conts N value V"
 *   child SIG    fork a child that raises SIG at once (and, continued, writes "child resumed conts N"
 *                then pauses); answered once waitpid(WUNTRACED) saw it stop: "forked PID stopped S"
 *   waitchild    waitpid(child, WUNTRACED | WCONTINUED): "child stopped S", "child continued",
 *                "child exited N" or "child killed N"
 *   threads N    start N threads that sleep in pause() (a stopped process of many threads)
 *   exit         exit 0
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "lineio.h"

static volatile sig_atomic_t conts;
static long value;
static pid_t child = -1;

static void on_cont(int sig) {
    (void)sig;
    conts++;
}

static void say(const char *fmt, long a, long b) {
    char buf[128];
    int n = snprintf(buf, sizeof buf, fmt, a, b);
    if (write(1, buf, n) != n) _exit(3);
}

static void *sleeper(void *arg) {
    (void)arg;
    for (;;) pause();
    return NULL;
}

int main(int argc, char **argv) {
    char line[256];
    value = argc > 1 ? atol(argv[1]) : 0;
    struct sigaction sa = {.sa_handler = on_cont, .sa_flags = SA_RESTART};
    sigaction(SIGCONT, &sa, NULL);
    say("ready %ld%.0ld\n", (long)getpid(), 0);
    while (read_command(line, sizeof line) > 0) {
        int sig = 0, n = 0;
        if (sscanf(line, "stop %d", &sig) == 1) {
            say("stopping%.0ld%.0ld\n", 0, 0);
            raise(sig);
            say("resumed conts %ld value %ld\n", conts, value);
        } else if (!strcmp(line, "ping\n")) {
            say("pong conts %ld value %ld\n", conts, value);
        } else if (sscanf(line, "child %d", &sig) == 1) {
            int st;
            child = fork();
            if (child == 0) {
                raise(sig);
                say("child resumed conts %ld%.0ld\n", conts, 0);
                for (;;) pause();
            }
            if (waitpid(child, &st, WUNTRACED) != child || !WIFSTOPPED(st)) _exit(4);
            say("forked %ld stopped %ld\n", child, WSTOPSIG(st));
        } else if (!strcmp(line, "waitchild\n")) {
            int st;
            pid_t got = waitpid(child, &st, WUNTRACED | WCONTINUED);
            if (got != child)
                say("child error %ld errno %ld\n", (long)got, errno);
            else if (WIFSTOPPED(st))
                say("child stopped %ld%.0ld\n", WSTOPSIG(st), 0);
            else if (WIFCONTINUED(st))
                say("child continued%.0ld%.0ld\n", 0, 0);
            else if (WIFEXITED(st))
                say("child exited %ld%.0ld\n", WEXITSTATUS(st), 0);
            else
                say("child killed %ld%.0ld\n", WTERMSIG(st), 0);
        } else if (sscanf(line, "threads %d", &n) == 1) {
            for (int i = 0; i < n; i++) {
                pthread_t t;
                pthread_create(&t, NULL, sleeper, NULL);
            }
            say("threads %ld%.0ld\n", (long)n, 0);
        } else if (!strcmp(line, "exit\n")) {
            return 0;
        } else {
            say("unknown%.0ld%.0ld\n", 0, 0);
        }
    }
    return 0;
}
