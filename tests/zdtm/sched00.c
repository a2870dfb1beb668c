/* Scheduling: SCHED_BATCH with a nice value, CPU affinity to one CPU, I/O priority. */
#include "zdtm.h"
#include <sched.h>
#include <sys/resource.h>

static void check(void)
{
	cpu_set_t s;
	if (sched_getscheduler(0) != SCHED_BATCH)
		fail("policy %d", sched_getscheduler(0));
	errno = 0;
	if (getpriority(PRIO_PROCESS, 0) != 7)
		fail("nice %d", getpriority(PRIO_PROCESS, 0));
	sched_getaffinity(0, sizeof s, &s);
	if (CPU_COUNT(&s) != 1 || !CPU_ISSET(0, &s))
		fail("affinity: %d cpus", CPU_COUNT(&s));
	long io = syscall(SYS_ioprio_get, 1, 0);
	if (io != ((2 << 13) | 5))
		fail("ioprio %lx", io);
}

int main(void)
{
	struct sched_param p = {0};
	cpu_set_t s;
	CPU_ZERO(&s);
	CPU_SET(0, &s);
	if (sched_setscheduler(0, SCHED_BATCH, &p) || setpriority(PRIO_PROCESS, 0, 7) ||
	    sched_setaffinity(0, sizeof s, &s) || syscall(SYS_ioprio_set, 1, 0, (2 << 13) | 5))
		die("sched");
	zd_main(NULL, check);
}
