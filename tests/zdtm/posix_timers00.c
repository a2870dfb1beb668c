/* POSIX timers on several clocks: the same ids, intervals, and an expiry that still signals. */
#include "zdtm.h"
#include <signal.h>
#include <time.h>

static timer_t t[3];
static volatile int fired;

static void on(int s, siginfo_t *si, void *u)
{
	(void)s;
	(void)u;
	if (si->si_value.sival_int == 42)
		fired++;
}

static void check(void)
{
	struct itimerspec v;
	clockid_t clocks[3] = {CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_BOOTTIME};
	for (int i = 0; i < 3; i++) {
		if (timer_gettime(t[i], &v)) {
			fail("timer %d (clock %d): timer_gettime errno %d", i, clocks[i], errno);
			continue;
		}
		if (v.it_interval.tv_sec != 2000 + i || v.it_value.tv_sec == 0 || v.it_value.tv_sec > 1000 + i)
			fail("timer %d: interval %ld value %ld", i, v.it_interval.tv_sec, v.it_value.tv_sec);
	}
	/* A one-shot timer armed now on a restored timer must still deliver its signal. */
	struct itimerspec soon = {.it_value = {0, 1000000}};
	sigset_t none;
	sigemptyset(&none);
	if (timer_settime(t[0], 0, &soon, NULL))
		fail("timer_settime errno %d", errno);
	while (!fired)
		sigsuspend(&none);
}

int main(void)
{
	clockid_t clocks[3] = {CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_BOOTTIME};
	struct sigaction sa = {.sa_sigaction = on, .sa_flags = SA_SIGINFO | SA_RESTART};
	sigaction(SIGRTMIN + 1, &sa, NULL);
	for (int i = 0; i < 3; i++) {
		struct sigevent ev = {.sigev_notify = SIGEV_SIGNAL, .sigev_signo = SIGRTMIN + 1};
		struct itimerspec v = {.it_interval = {2000 + i, 0}, .it_value = {1000 + i, 0}};
		ev.sigev_value.sival_int = 42;
		if (timer_create(clocks[i], &ev, &t[i]) || timer_settime(t[i], 0, &v, NULL))
			die("timer_create");
	}
	zd_main(NULL, check);
}
