/* timerfd and signalfd: an armed periodic timerfd keeps its interval; a signalfd its mask and a
 * signal queued for it. */
#include "zdtm.h"
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>

static int tf, sf;

static void check(void)
{
	struct itimerspec v;
	struct signalfd_siginfo si;
	if (timerfd_gettime(tf, &v) || v.it_interval.tv_sec != 3000 || v.it_value.tv_sec == 0 ||
	    v.it_value.tv_sec > 1000)
		fail("timerfd: interval %ld value %ld", v.it_interval.tv_sec, v.it_value.tv_sec);
	if (read(sf, &si, sizeof si) != sizeof si || si.ssi_signo != (uint32_t)SIGRTMIN + 4 || si.ssi_int != 99)
		fail("signalfd: signo %u int %d", si.ssi_signo, si.ssi_int);
	if (read(sf, &si, sizeof si) != -1 || errno != EAGAIN)
		fail("signalfd: not empty or blocking");
}

int main(void)
{
	sigset_t m;
	sigemptyset(&m);
	sigaddset(&m, SIGRTMIN + 4);
	sigaddset(&m, SIGRTMIN + 6);
	sigprocmask(SIG_BLOCK, &m, NULL);
	sf = signalfd(-1, &m, SFD_NONBLOCK);
	tf = timerfd_create(CLOCK_MONOTONIC, 0);
	struct itimerspec v = {.it_interval = {3000, 0}, .it_value = {1000, 0}};
	if (sf < 0 || tf < 0 || timerfd_settime(tf, 0, &v, NULL))
		die("timerfd/signalfd");
	sigqueue(getpid(), SIGRTMIN + 4, (union sigval){.sival_int = 99});
	zd_main(NULL, check);
}
