/* rseq: glibc's registration still in place (registering again gives EBUSY), cpu_id kept current. */
#include "zdtm.h"
#include <sched.h>
#include <signal.h>
#include <sys/rseq.h>

static void check(void)
{
	struct rseq *rs = (struct rseq *)((char *)__builtin_thread_pointer() + __rseq_offset);
	if (__rseq_size == 0) {
		fail("glibc registered no rseq");
		return;
	}
	/* glibc registers max(__rseq_size, 32) bytes: the same area and length again gives EBUSY */
	long r = syscall(SYS_rseq, rs, __rseq_size < 32 ? 32 : __rseq_size, 0, 0x53053053);
	if (r != -1 || errno != EBUSY)
		fail("rseq registration lost: registering again gave %ld errno %d", r, errno);
	rs->cpu_id = (uint32_t)-7;
	raise(SIGUSR2); /* a signal delivery makes the kernel write the rseq area again */
	if ((int)rs->cpu_id < 0)
		fail("cpu_id not updated by the kernel: %d", (int)rs->cpu_id);
}

static void on_usr2(int s) { (void)s; }

int main(void)
{
	signal(SIGUSR2, on_usr2);
	zd_main(NULL, check);
}
