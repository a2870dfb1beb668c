"""A real program for restore tests: a deterministic computation that writes its result at the end.

usage: python3 compute.py OUT STEPS   exactly STEPS steps, back to back (a reference run)
       python3 compute.py OUT stop    a step every 10 ms until a line "stop" on stdin
Prints "ready", then "step N" every 10 steps, then "done N" once OUT (the result of N steps) is
written. The second form is the one a test dumps or migrates: it is mid-computation however long
the dump or migration takes on a loaded machine (a fixed count of paced steps could run out first),
and the test stops the copy once it has seen it compute, then compares OUT with a reference run of
as many steps.
"""

import hashlib
import select
import sys

out, arg = sys.argv[1], sys.argv[2]
until_stop = arg == "stop"
steps = 0 if until_stop else int(arg)
h = hashlib.sha256(b"seed")
acc: list[str] = []
table: dict[int, int] = {}
print("ready", flush=True)
i = 0
while until_stop or i < steps:
    for _ in range(500):
        h = hashlib.sha256(h.digest())
    acc.append(h.hexdigest()[:16])
    table = {k: k * i + len(acc) for k in range(300)}
    if i % 10 == 0:
        print(f"step {i}", flush=True)
    i += 1
    # The pace, and the test's "stop" wakes it. A dump may freeze it inside this select: the copy
    # goes on waiting on its own stdin, which its restore gave it.
    if until_stop and select.select([sys.stdin], [], [], 0.01)[0]:
        line = sys.stdin.readline()
        if line != "stop\n":
            sys.exit(f"compute.py: expected 'stop' on stdin, got {line!r}")
        break
with open(out, "w") as f:
    f.write("\n".join(acc) + f"\n{sum(table.values())}\n")
print(f"done {i}", flush=True)
