/* The command reader of the test targets.
 *
 * One line from fd 0 with read(2), a byte at a time, so that nothing is ever buffered inside stdio:
 * between two commands the calling thread is always blocked in read(), which is what the tests
 * check a dump against. Returns the line's length (the newline kept, NUL-terminated), 0 at EOF. */
#ifndef CKPT_TEST_LINEIO_H
#define CKPT_TEST_LINEIO_H
#include <unistd.h>

static inline size_t read_command(char *line, size_t size) {
    size_t n = 0;
    while (n + 1 < size) {
        if (read(0, line + n, 1) <= 0) break;
        if (line[n++] == '\n') break;
    }
    line[n] = 0;
    return n;
}
#endif
