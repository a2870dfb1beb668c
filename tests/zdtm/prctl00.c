/* prctl flags: name, dumpable, child subreaper, no_new_privs, timer slack, THP disable, keepcaps. */
#include "zdtm.h"
#include <sys/prctl.h>

static void check(void)
{
	char name[17] = {0};
	prctl(PR_GET_NAME, name);
	if (strcmp(name, "zdtm-prctl-name"))
		fail("name %s", name);
	if (prctl(PR_GET_DUMPABLE) != 0)
		fail("dumpable %d", prctl(PR_GET_DUMPABLE));
	int sr = 0;
	prctl(PR_GET_CHILD_SUBREAPER, &sr);
	if (sr != 1)
		fail("subreaper %d", sr);
	if (prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1)
		fail("no_new_privs %d", prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0));
	if (prctl(PR_GET_TIMERSLACK) != 123456)
		fail("timerslack %d", prctl(PR_GET_TIMERSLACK));
	if (prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0) != 1)
		fail("thp_disable %d", prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0));
	if (prctl(PR_GET_KEEPCAPS) != 1)
		fail("keepcaps %d", prctl(PR_GET_KEEPCAPS));
}

int main(void)
{
	prctl(PR_SET_NAME, "zdtm-prctl-name");
	prctl(PR_SET_CHILD_SUBREAPER, 1);
	prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
	prctl(PR_SET_TIMERSLACK, 123456);
	prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0);
	prctl(PR_SET_KEEPCAPS, 1);
	prctl(PR_SET_DUMPABLE, 0);
	zd_main(NULL, check);
}
