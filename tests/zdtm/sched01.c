/* A real-time policy: SCHED_RR priority 3 with SCHED_RESET_ON_FORK. */
#include "zdtm.h"
#include <sched.h>

static void check(void)
{
	struct sched_param p;
	int pol = sched_getscheduler(0);
	sched_getparam(0, &p);
	if (pol != (SCHED_RR | SCHED_RESET_ON_FORK) || p.sched_priority != 3)
		fail("policy %x priority %d", pol, p.sched_priority);
}

int main(void)
{
	struct sched_param p = {.sched_priority = 3};
	if (sched_setscheduler(0, SCHED_RR | SCHED_RESET_ON_FORK, &p))
		die("sched_setscheduler");
	zd_main(NULL, check);
}
