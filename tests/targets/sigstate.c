/* A target whose signal state the tests set up, to check that a dump leaves it exactly as it was.
 *
 * Prints "ready PID" and answers on stdin:
 *   pend SIG -> blocks SIG in the main thread and sends it to that thread: pending and blocked ("pending SIG")
 *   block SIG  -> blocks SIG in the main thread ("blocked SIG")
 *   ignore SIG -> sets SIG's action to SIG_IGN ("ignored SIG")
 *   open     -> opens /dev/null, prints "fd N", closes it again (the number the next open() gets)
 *   ping     -> "pong"
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "lineio.h"

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %d\n", getpid());
    char line[64];
    for (;;) {
        if (!read_command(line, sizeof line)) return 0;
        if (!strncmp(line, "pend ", 5)) {
            int sig = atoi(line + 5);
            sigset_t s;
            sigemptyset(&s);
            sigaddset(&s, sig);
            sigprocmask(SIG_BLOCK, &s, NULL);
            syscall(SYS_tgkill, getpid(), gettid(), sig);
            printf("pending %d\n", sig);
        } else if (!strncmp(line, "block ", 6)) {
            int sig = atoi(line + 6);
            sigset_t s;
            sigemptyset(&s);
            sigaddset(&s, sig);
            sigprocmask(SIG_BLOCK, &s, NULL);
            printf("blocked %d\n", sig);
        } else if (!strncmp(line, "ignore ", 7)) {
            int sig = atoi(line + 7);
            signal(sig, SIG_IGN);
            printf("ignored %d\n", sig);
        } else if (!strncmp(line, "open", 4)) {
            int fd = open("/dev/null", O_RDONLY);
            close(fd);  /* before the answer: once it is read, the fd table is as it was */
            printf("fd %d\n", fd);
        } else {
            puts(strncmp(line, "ping", 4) ? "unknown" : "pong");
        }
    }
}
