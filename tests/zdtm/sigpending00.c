/* Pending signals: blocked standard and real-time signals, queued with values, in order. */
#include "zdtm.h"
#include <signal.h>

static void check(void)
{
	sigset_t set, pend;
	siginfo_t si;
	struct timespec zero = {0, 0};
	sigemptyset(&set);
	sigaddset(&set, SIGUSR2);
	sigaddset(&set, SIGRTMIN + 3);
	sigaddset(&set, SIGRTMIN + 5);
	sigpending(&pend);
	for (int s = 1; s < SIGRTMAX; s++)
		if (sigismember(&pend, s) != sigismember(&set, s))
			fail("signal %d pending %d, want %d", s, sigismember(&pend, s), sigismember(&set, s));
	if (sigtimedwait(&set, &si, &zero) != SIGUSR2 || si.si_value.sival_int != 7)
		fail("first: %d value %d", si.si_signo, si.si_value.sival_int);
	for (int i = 0; i < 3; i++)
		if (sigtimedwait(&set, &si, &zero) != SIGRTMIN + 3 || si.si_value.sival_int != 100 + i)
			fail("rt %d: %d value %d", i, si.si_signo, si.si_value.sival_int);
	if (sigtimedwait(&set, &si, &zero) != SIGRTMIN + 5 || si.si_value.sival_int != 55)
		fail("rt5: %d value %d", si.si_signo, si.si_value.sival_int);
	if (sigtimedwait(&set, &si, &zero) != -1)
		fail("one more signal: %d", si.si_signo);
}

int main(void)
{
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGUSR2);
	sigaddset(&set, SIGRTMIN + 3);
	sigaddset(&set, SIGRTMIN + 5);
	sigprocmask(SIG_BLOCK, &set, NULL);
	sigqueue(getpid(), SIGUSR2, (union sigval){.sival_int = 7});
	sigqueue(getpid(), SIGRTMIN + 5, (union sigval){.sival_int = 55});
	for (int i = 0; i < 3; i++)
		sigqueue(getpid(), SIGRTMIN + 3, (union sigval){.sival_int = 100 + i});
	zd_main(NULL, check);
}
