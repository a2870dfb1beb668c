/* The vdso after a restore: clock_gettime and gettimeofday through it, times never going back.
 * time() is compared with itself: it reads the coarse clock, updated at the tick, which lags a
 * CLOCK_REALTIME read just past a second's boundary by up to a tick (a run with no ckpt at all
 * once failed so, comparing it with clock_gettime's seconds). */
#include "zdtm.h"
#include <sys/auxv.h>
#include <sys/time.h>
#include <time.h>

static struct timespec mono0, real0;
static time_t time0;

static void check(void)
{
	struct timespec m, r, raw;
	struct timeval tv;
	clock_gettime(CLOCK_MONOTONIC, &m);
	clock_gettime(CLOCK_REALTIME, &r);
	gettimeofday(&tv, NULL);
	if (m.tv_sec < mono0.tv_sec || r.tv_sec < real0.tv_sec)
		fail("clock went back");
	if (tv.tv_sec < r.tv_sec - 1 || tv.tv_sec > r.tv_sec + 1)
		fail("gettimeofday %ld vs realtime %ld", tv.tv_sec, r.tv_sec);
	syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &raw);
	if (raw.tv_sec < m.tv_sec || raw.tv_sec > m.tv_sec + 2)
		fail("vdso monotonic %ld vs syscall %ld", m.tv_sec, raw.tv_sec);
	if (time(NULL) < time0)
		fail("time() went back");
	if (getauxval(AT_SYSINFO_EHDR) == 0)
		fail("no vdso in auxv");
}

int main(void)
{
	clock_gettime(CLOCK_MONOTONIC, &mono0);
	clock_gettime(CLOCK_REALTIME, &real0);
	time0 = time(NULL);
	zd_main(NULL, check);
}
