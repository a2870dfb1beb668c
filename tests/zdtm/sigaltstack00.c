/* sigaltstack: the alternate signal stack and a handler that runs on it (SA_ONSTACK). */
#include "zdtm.h"
#include <signal.h>

static char altstack[64 * 1024];
static volatile uintptr_t seen_sp;

static void handler(int sig)
{
	int here;
	(void)sig;
	seen_sp = (uintptr_t)&here;
}

static void check(void)
{
	stack_t ss;
	sigaltstack(NULL, &ss);
	if (ss.ss_sp != altstack || ss.ss_size != sizeof altstack || (ss.ss_flags & SS_DISABLE))
		fail("sigaltstack %p/%zu/%d, was %p/%zu", ss.ss_sp, ss.ss_size, ss.ss_flags, (void *)altstack,
		     sizeof altstack);
	raise(SIGUSR2);
	if (seen_sp < (uintptr_t)altstack || seen_sp >= (uintptr_t)altstack + sizeof altstack)
		fail("the handler ran off the alternate stack (sp %lx)", (unsigned long)seen_sp);
}

int main(void)
{
	stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack};
	struct sigaction sa = {.sa_handler = handler, .sa_flags = SA_ONSTACK};
	if (sigaltstack(&ss, NULL) || sigaction(SIGUSR2, &sa, NULL))
		die("sigaltstack");
	zd_main(NULL, check);
}
