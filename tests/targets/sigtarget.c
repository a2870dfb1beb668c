/* A target with known signal dispositions and masks, that counts the signals it receives.
 *
 *   SIGUSR1   handler on_usr1, SA_SIGINFO | SA_RESTART, sa_mask = {SIGUSR2}
 *   SIGUSR2   ignored (SIG_IGN)
 *   SIGRTMIN  handler on_rt, SA_SIGINFO | SA_RESTART; sums si_value.sival_int (sigqueue'd values)
 * The main thread blocks SIGWINCH and SIGURG and then blocks in read(0); a second thread blocks
 * SIGPROF only and waits in read() on a pipe nobody writes. Commands (stdin):
 *   info    -> "usr1 ADDR rt ADDR"             (the handlers' addresses)
 *   count   -> "usr1 N code C pid P rt N sum S" (C, P: si_code and si_pid of the last SIGUSR1)
 *   exit    -> exit(0)
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "lineio.h"

static volatile int usr1_count, usr1_code, usr1_pid, rt_count;
static volatile long rt_sum;

static void on_usr1(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)uc;
    __atomic_add_fetch(&usr1_count, 1, __ATOMIC_SEQ_CST);
    usr1_code = si->si_code;
    usr1_pid = si->si_pid;
}

static void on_rt(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)uc;
    /* Both threads may run it at once: atomics, or concurrent updates get lost. */
    __atomic_add_fetch(&rt_sum, si->si_value.sival_int, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&rt_count, 1, __ATOMIC_SEQ_CST);
}

static void *blocked_thread(void *arg) {
    int fd = *(int *)arg;
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, SIGPROF);
    pthread_sigmask(SIG_SETMASK, &m, NULL);
    char c;
    for (;;) if (read(fd, &c, 1) <= 0) pause();
    return NULL;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_usr1;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGUSR2);
    sigaction(SIGUSR1, &sa, NULL);
    sa.sa_sigaction = on_rt;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGRTMIN, &sa, NULL);
    signal(SIGUSR2, SIG_IGN);

    static int pfd[2];
    if (pipe(pfd)) { perror("pipe"); return 1; }
    pthread_t t;
    pthread_create(&t, NULL, blocked_thread, &pfd[0]);  /* before the mask: it sets its own */
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, SIGWINCH);
    sigaddset(&m, SIGURG);
    pthread_sigmask(SIG_SETMASK, &m, NULL);

    printf("ready %d\n", getpid());
    char line[64];
    for (;;) {
        if (!read_command(line, sizeof line)) return 0;
        if (!strncmp(line, "info", 4))
            printf("usr1 %p rt %p\n", (void *)on_usr1, (void *)on_rt);
        else if (!strncmp(line, "count", 5))
            printf("usr1 %d code %d pid %d rt %d sum %ld\n", (int)usr1_count, (int)usr1_code, (int)usr1_pid,
                   (int)rt_count, rt_sum);
        else if (!strncmp(line, "exit", 4))
            return 0;
        else
            puts("unknown");
    }
}
