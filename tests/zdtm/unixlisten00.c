/* A listening unix socket bound to a path. */
#include "zdtm.h"
#include <sys/socket.h>
#include <sys/un.h>

static int ls;

static void check(void)
{
	struct sockaddr_un a = {.sun_family = AF_UNIX, .sun_path = "unixlisten00.sock"};
	int c = socket(AF_UNIX, SOCK_STREAM, 0);
	if (connect(c, (struct sockaddr *)&a, sizeof a))
		fail("connect: errno %d", errno);
	int s = accept(ls, NULL, NULL);
	char b[2];
	if (s < 0 || write(c, "u", 1) != 1 || read(s, b, 1) != 1)
		fail("accept/echo");
}

int main(void)
{
	struct sockaddr_un a = {.sun_family = AF_UNIX, .sun_path = "unixlisten00.sock"};
	ls = socket(AF_UNIX, SOCK_STREAM, 0);
	if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 5))
		die("bind");
	zd_main(NULL, check);
}
