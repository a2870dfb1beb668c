/* Threads blocked in different waits, each with its name and signal mask: one in sigwaitinfo (its
 * signal sent after the restore), one in a timed futex wait, one in nanosleep. */
#include "zdtm.h"
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <time.h>

static pthread_t th[3];
static pid_t tids[3];
static volatile int futex_word, ready, got_sig[3];
static const char *names[3] = {"zd-sigwait", "zd-futex", "zd-sleep"};

static void *t_sigwait(void *a)
{
	(void)a;
	sigset_t s;
	int sig = 0;
	pthread_setname_np(pthread_self(), names[0]);
	tids[0] = (pid_t)syscall(SYS_gettid);
	sigemptyset(&s);
	sigaddset(&s, SIGRTMIN + 2);
	__sync_fetch_and_add(&ready, 1);
	sigwait(&s, &sig);
	got_sig[0] = sig == SIGRTMIN + 2;
	return NULL;
}

static void *t_futex(void *a)
{
	(void)a;
	struct timespec ts = {100000, 0};
	pthread_setname_np(pthread_self(), names[1]);
	tids[1] = (pid_t)syscall(SYS_gettid);
	__sync_fetch_and_add(&ready, 1);
	while (futex_word == 0)
		syscall(SYS_futex, &futex_word, FUTEX_WAIT_PRIVATE, 0, &ts, NULL, 0);
	got_sig[1] = 1;
	return NULL;
}

static void *t_sleep(void *a)
{
	(void)a;
	struct timespec ts = {100000, 0};
	pthread_setname_np(pthread_self(), names[2]);
	tids[2] = (pid_t)syscall(SYS_gettid);
	__sync_fetch_and_add(&ready, 1);
	while (nanosleep(&ts, &ts) == -1 && errno == EINTR && !got_sig[2])
		;
	return NULL;
}

static void on_usr2(int s) { (void)s; got_sig[2] = 1; }

static void check(void)
{
	char path[64], name[32];
	for (int i = 0; i < 3; i++) {
		snprintf(path, sizeof path, "/proc/self/task/%d/comm", tids[i]);
		if (zd_readfile(path, name, sizeof name) < 0)
			fail("thread %d (tid %d) is gone", i, tids[i]);
		name[strcspn(name, "\n")] = 0;
		if (strcmp(name, names[i]))
			fail("thread %d name %s", i, name);
	}
	syscall(SYS_tgkill, getpid(), tids[0], SIGRTMIN + 2);
	futex_word = 1;
	syscall(SYS_futex, &futex_word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
	syscall(SYS_tgkill, getpid(), tids[2], SIGUSR2);
	for (int i = 0; i < 3; i++)
		pthread_join(th[i], NULL);
	if (!got_sig[0] || !got_sig[1] || !got_sig[2])
		fail("woken: sigwait %d futex %d sleep %d", got_sig[0], got_sig[1], got_sig[2]);
}

int main(void)
{
	sigset_t s;
	struct sigaction sa = {.sa_handler = on_usr2};
	sigaction(SIGUSR2, &sa, NULL);
	sigemptyset(&s);
	sigaddset(&s, SIGRTMIN + 2);
	pthread_sigmask(SIG_BLOCK, &s, NULL); /* inherited by every thread: only sigwait takes it */
	pthread_create(&th[0], NULL, t_sigwait, NULL);
	pthread_create(&th[1], NULL, t_futex, NULL);
	pthread_create(&th[2], NULL, t_sleep, NULL);
	while (ready < 3)
		sched_yield();
	/* each blocked in its wait before "ready" (the futex and sleep ones may still be on the way:
	 * either is fine for the dump) */
	zd_main(NULL, check);
}
