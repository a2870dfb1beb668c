/* Signal dispositions: handlers with flags and masks, ignored signals, and the blocked mask. */
#include "zdtm.h"
#include <signal.h>
#ifndef SA_RESTORER
#define SA_RESTORER 0x04000000
#endif

static struct sigaction sa0[65];
static sigset_t mask0;
static volatile int hits;

static void h1(int s) { (void)s; hits++; }
static void h2(int s, siginfo_t *si, void *u) { (void)s; (void)si; (void)u; hits += 10; }

static void check(void)
{
	sigset_t m;
	for (int s = 1; s < 65; s++) {
		struct sigaction sa;
		if (s == SIGKILL || s == SIGSTOP || sigaction(s, NULL, &sa))
			continue;
		if (sa.sa_handler != sa0[s].sa_handler || (sa.sa_flags & ~SA_RESTORER) != (sa0[s].sa_flags & ~SA_RESTORER) ||
		    memcmp(&sa.sa_mask, &sa0[s].sa_mask, 8))
			fail("sigaction %d: handler %p flags %x, was %p %x", s, (void *)sa.sa_handler, sa.sa_flags,
			     (void *)sa0[s].sa_handler, sa0[s].sa_flags);
	}
	sigprocmask(SIG_BLOCK, NULL, &m);
	if (memcmp(&m, &mask0, 8))
		fail("blocked mask differs");
	raise(SIGHUP);
	raise(SIGWINCH);
	raise(SIGPIPE); /* ignored */
	if (hits != 11)
		fail("handlers ran %d, want 11", hits);
}

int main(void)
{
	struct sigaction a = {.sa_handler = h1, .sa_flags = SA_RESTART | SA_NODEFER};
	struct sigaction b = {.sa_sigaction = h2, .sa_flags = SA_SIGINFO | SA_RESETHAND};
	sigaddset(&a.sa_mask, SIGTERM);
	sigaddset(&b.sa_mask, SIGRTMIN + 2);
	sigaction(SIGHUP, &a, NULL);
	sigaction(SIGWINCH, &b, NULL);
	signal(SIGPIPE, SIG_IGN);
	signal(SIGRTMIN + 7, SIG_IGN);
	sigemptyset(&mask0);
	sigaddset(&mask0, SIGXCPU);
	sigaddset(&mask0, SIGRTMIN + 9);
	sigprocmask(SIG_BLOCK, &mask0, NULL);
	sigprocmask(SIG_BLOCK, NULL, &mask0);
	for (int s = 1; s < 65; s++)
		if (s != SIGKILL && s != SIGSTOP)
			sigaction(s, NULL, &sa0[s]);
	zd_main(NULL, check);
}
