/* Per-process /proc knobs: oom_score_adj, coredump_filter, loginuid, comm. */
#include "zdtm.h"

static void put(const char *f, const char *v)
{
	int fd = open(f, O_WRONLY);
	if (fd < 0 || write(fd, v, strlen(v)) < 0)
		die("write %s", f);
	close(fd);
}

static void want(const char *f, const char *v)
{
	char buf[128] = {0};
	zd_readfile(f, buf, sizeof buf);
	buf[strcspn(buf, "\n")] = 0;
	if (strcmp(buf, v))
		fail("%s: %s, was %s", f, buf, v);
}

static void check(void)
{
	want("/proc/self/oom_score_adj", "321");
	want("/proc/self/coredump_filter", "0000007b");
	want("/proc/self/loginuid", "4242");
	want("/proc/self/comm", "zdtm-comm");
}

int main(void)
{
	put("/proc/self/oom_score_adj", "321");
	put("/proc/self/coredump_filter", "0x7b");
	put("/proc/self/loginuid", "4242");
	put("/proc/self/comm", "zdtm-comm");
	zd_main(NULL, check);
}
