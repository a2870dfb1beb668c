/* A POSIX message queue fd with messages in it. */
#include "zdtm.h"
#include <mqueue.h>

static mqd_t q;
static char name[64];

static void check(void)
{
	char buf[8192] = {0};
	unsigned prio = 0;
	if (mq_receive(q, buf, sizeof buf, &prio) != 5 || strcmp(buf, "mqmsg") || prio != 3)
		fail("mq message: %s prio %u errno %d", buf, prio, errno);
	mq_unlink(name);
}

int main(void)
{
	struct mq_attr at = {.mq_maxmsg = 4, .mq_msgsize = 64};
	snprintf(name, sizeof name, "/zdtm-mq-%d", getpid());
	q = mq_open(name, O_RDWR | O_CREAT, 0600, &at);
	if (q == (mqd_t)-1 || mq_send(q, "mqmsg", 5, 3))
		die("mq");
	zd_main(NULL, check);
}
