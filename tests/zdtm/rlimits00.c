/* Every resource limit: lowered soft and hard values come back. */
#include "zdtm.h"
#include <sys/resource.h>

static struct rlimit lim0[RLIM_NLIMITS];

static void check(void)
{
	for (int r = 0; r < RLIM_NLIMITS; r++) {
		struct rlimit l;
		getrlimit(r, &l);
		if (l.rlim_cur != lim0[r].rlim_cur || l.rlim_max != lim0[r].rlim_max)
			fail("rlimit %d: %llu/%llu, was %llu/%llu", r, (unsigned long long)l.rlim_cur,
			     (unsigned long long)l.rlim_max, (unsigned long long)lim0[r].rlim_cur,
			     (unsigned long long)lim0[r].rlim_max);
	}
}

int main(void)
{
	for (int r = 0; r < RLIM_NLIMITS; r++) {
		struct rlimit l;
		getrlimit(r, &l);
		if (r == RLIMIT_NOFILE) {
			l.rlim_cur = 200;
			l.rlim_max = 300;
		} else if (r == RLIMIT_STACK || r == RLIMIT_AS || r == RLIMIT_DATA) {
			/* leave what the process runs with */
		} else if (l.rlim_max == RLIM_INFINITY) {
			l.rlim_max = 1ULL << 40;
			l.rlim_cur = (1ULL << 39) + r;
		} else if (l.rlim_max > 2) {
			l.rlim_cur = l.rlim_max - 1;
		}
		if (setrlimit(r, &l))
			die("setrlimit %d", r);
		getrlimit(r, &lim0[r]);
	}
	zd_main(NULL, check);
}
