/* A POSIX timer aimed at one thread (SIGEV_THREAD_ID), for tests/test_pidns.py: the restore names
 * that thread to timer_create by its tid, which inside a new pid namespace is the namespace's.
 *
 * A second thread makes the timer (signal SIGRTMIN to itself alone) and waits for it in
 * sigwaitinfo; each fire it writes its gettid() to a pipe. On "check" the main thread arms the timer
 * and reads the pipe: "ok" if the timer reached the thread and both threads have the tids they had.
 * Usage: pidns_timer       prints "ready MAIN_TID THREAD_TID", then answers "check" lines.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static pid_t main_tid, thread_tid;
static timer_t timer;
static int fds[2];
static pthread_barrier_t ready;

static void *run(void *arg) {
    (void)arg;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGRTMIN);
    thread_tid = gettid();
    struct sigevent ev;
    memset(&ev, 0, sizeof ev);
    ev.sigev_notify = SIGEV_THREAD_ID;
    ev.sigev_signo = SIGRTMIN;
    ev._sigev_un._tid = thread_tid; /* sigev_notify_thread_id, which older glibc lacks */
    if (timer_create(CLOCK_MONOTONIC, &ev, &timer)) {
        perror("timer_create");
        _exit(2);
    }
    pthread_barrier_wait(&ready);
    for (;;) {
        siginfo_t si;
        if (sigwaitinfo(&set, &si) != SIGRTMIN)
            continue;
        pid_t me = gettid();
        if (write(fds[1], &me, sizeof me) != sizeof me)
            _exit(3);
    }
    return NULL;
}

int main(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGRTMIN);
    pthread_sigmask(SIG_BLOCK, &set, NULL); /* inherited by the thread: only sigwaitinfo takes it */
    main_tid = gettid();
    if (pipe(fds))
        return 1;
    pthread_barrier_init(&ready, NULL, 2);
    pthread_t t;
    if (pthread_create(&t, NULL, run, NULL))
        return 1;
    pthread_barrier_wait(&ready);
    printf("ready %d %d\n", main_tid, thread_tid);
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "check", 5)) {
            printf("unknown command\n");
        } else {
            struct itimerspec its = {.it_value = {0, 1000000}};
            pid_t got = 0;
            if (timer_settime(timer, 0, &its, NULL))
                printf("timer_settime failed\n");
            else if (read(fds[0], &got, sizeof got) != sizeof got)
                printf("read failed\n");
            else if (gettid() != main_tid || got != thread_tid)
                printf("bad: main %d (was %d), timer reached %d (thread was %d)\n", gettid(), main_tid, got,
                       thread_tid);
            else
                printf("ok\n");
        }
        fflush(stdout);
    }
    return 0;
}
