/* Interval timers (ITIMER_REAL, VIRTUAL, PROF) keep their interval and the time left. */
#include "zdtm.h"
#include <signal.h>
#include <sys/time.h>

static struct itimerval v0[3];

static void check(void)
{
	for (int w = 0; w < 3; w++) {
		struct itimerval v;
		getitimer(w, &v);
		if (v.it_interval.tv_sec != v0[w].it_interval.tv_sec || v.it_interval.tv_usec != v0[w].it_interval.tv_usec)
			fail("itimer %d interval %ld.%06ld, was %ld.%06ld", w, v.it_interval.tv_sec, v.it_interval.tv_usec,
			     v0[w].it_interval.tv_sec, v0[w].it_interval.tv_usec);
		if (v.it_value.tv_sec == 0 && v.it_value.tv_usec == 0)
			fail("itimer %d disarmed", w);
		if (v.it_value.tv_sec > v0[w].it_value.tv_sec)
			fail("itimer %d has more time left (%ld s) than it was set to (%ld s)", w, v.it_value.tv_sec,
			     v0[w].it_value.tv_sec);
	}
}

int main(void)
{
	for (int w = 0; w < 3; w++) {
		v0[w].it_interval.tv_sec = 1000 + w;
		v0[w].it_interval.tv_usec = 1234 * (w + 1);
		v0[w].it_value.tv_sec = 500 + w;
		signal(w == 0 ? SIGALRM : w == 1 ? SIGVTALRM : SIGPROF, SIG_IGN);
		if (setitimer(w, &v0[w], NULL))
			die("setitimer");
	}
	zd_main(NULL, check);
}
