/* Mappings of every kind: private and shared anonymous, private and shared file, /dev/zero, with
 * holes, each with its protection and its bytes. */
#include "zdtm.h"

#define PG 4096
struct m {
	const char *what;
	char *addr;
	size_t len;
	int prot;
	int fill;
};
static struct m ms[8];
static int nm;

static void add(const char *what, char *addr, size_t len, int prot, int fill)
{
	if (addr == MAP_FAILED)
		die("mmap %s", what);
	ms[nm++] = (struct m){what, addr, len, prot, fill};
}

static unsigned char pattern(int fill, size_t i) { return (unsigned char)(fill * 37 + i * 13 + i / PG); }

static void touch(void)
{
	for (int k = 0; k < nm; k++)
		if (ms[k].prot & PROT_WRITE)
			ms[k].addr[PG + 5] = (char)pattern(ms[k].fill, PG + 5);
}

static void check(void)
{
	char flags[600], line[256];
	for (int k = 0; k < nm; k++) {
		for (size_t i = 0; i < ms[k].len; i++)
			if ((unsigned char)ms[k].addr[i] != pattern(ms[k].fill, i)) {
				fail("%s: byte %zu is %d, want %d", ms[k].what, i, ms[k].addr[i], pattern(ms[k].fill, i));
				break;
			}
		/* protection as /proc/self/maps shows it */
		FILE *f = fopen("/proc/self/maps", "r");
		while (f && fgets(line, sizeof line, f)) {
			unsigned long lo;
			char perms[5];
			if (sscanf(line, "%lx-%*x %4s", &lo, perms) == 2 && lo == (unsigned long)ms[k].addr) {
				if ((perms[0] == 'r') != !!(ms[k].prot & PROT_READ) ||
				    (perms[1] == 'w') != !!(ms[k].prot & PROT_WRITE))
					fail("%s: perms %s", ms[k].what, perms);
			}
		}
		if (f)
			fclose(f);
		(void)flags;
	}
}

int main(void)
{
	int fd = open("maps00.file", O_RDWR | O_CREAT | O_TRUNC, 0600);
	int fd2 = open("maps00.shared", O_RDWR | O_CREAT | O_TRUNC, 0600);
	int zero = open("/dev/zero", O_RDWR);
	char buf[PG];
	for (int p = 0; p < 16; p++) {
		for (int i = 0; i < PG; i++)
			buf[i] = (char)pattern(3, (size_t)(p * PG + i));
		write(fd, buf, PG);
		for (int i = 0; i < PG; i++)
			buf[i] = (char)pattern(4, (size_t)(p * PG + i));
		write(fd2, buf, PG);
	}
	add("private anon", mmap(NULL, 32 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), 32 * PG,
	    PROT_READ | PROT_WRITE, 1);
	add("shared anon", mmap(NULL, 8 * PG, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0), 8 * PG,
	    PROT_READ | PROT_WRITE, 2);
	add("private file", mmap(NULL, 16 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0), 16 * PG,
	    PROT_READ | PROT_WRITE, 3);
	add("shared file", mmap(NULL, 16 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, fd2, 0), 16 * PG,
	    PROT_READ | PROT_WRITE, 4);
	add("shared /dev/zero", mmap(NULL, 4 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, zero, 0), 4 * PG,
	    PROT_READ | PROT_WRITE, 5);
	add("private /dev/zero", mmap(NULL, 4 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, zero, 0), 4 * PG,
	    PROT_READ | PROT_WRITE, 6);
	char *ro = mmap(NULL, 8 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	close(zero);
	for (int k = 0; k < nm; k++) {
		if (ms[k].fill == 3 || ms[k].fill == 4) {
			/* private file: the file's bytes, some pages changed (COW); shared: the file's own */
			for (size_t i = 0; i < ms[k].len; i += 3 * PG)
				ms[k].addr[i] = (char)pattern(ms[k].fill, i);
			continue;
		}
		for (size_t i = 0; i < ms[k].len; i++)
			ms[k].addr[i] = (char)pattern(ms[k].fill, i);
	}
	for (size_t i = 0; i < 8 * PG; i++)
		ro[i] = (char)pattern(7, i);
	munmap(ro + 2 * PG, PG); /* a hole */
	mprotect(ro, 2 * PG, PROT_READ);
	add("read-only anon", ro, 2 * PG, PROT_READ, 7);
	zd_main(touch, check);
}
