/* eventfd: a counter and a semaphore-mode eventfd with its flags. */
#include "zdtm.h"
#include <sys/eventfd.h>

static int e, s;

static void check(void)
{
	uint64_t v = 0;
	if (read(e, &v, 8) != 8 || v != 123456789012ULL)
		fail("eventfd counter %llu", (unsigned long long)v);
	for (int i = 0; i < 3; i++)
		if (read(s, &v, 8) != 8 || v != 1)
			fail("semaphore read %d: %llu (EFD_SEMAPHORE lost?)", i, (unsigned long long)v);
	if (read(s, &v, 8) != -1 || errno != EAGAIN)
		fail("semaphore not empty or not non-blocking");
}

int main(void)
{
	e = eventfd(0, 0);
	s = eventfd(3, EFD_SEMAPHORE | EFD_NONBLOCK);
	uint64_t v = 123456789012ULL;
	if (e < 0 || s < 0 || write(e, &v, 8) != 8)
		die("eventfd");
	zd_main(NULL, check);
}
