"""Pre-copy live migration: `ckpt serve` (destination) and `ckpt migrate` (source).

wire.py     frames on a TCP stream (every size bounded), the message types
auth.py     the token file and the challenge-response both sides run before anything is stored
policy.py   stop rules: pure functions of the round history (shared with a later `ckpt simulate`)
throttle.py RATE parsing, the sender's token bucket, the SIGSTOP/SIGCONT duty cycle
cgthrottle.py the auto-converge throttle: cgroup v2 cpu.max, v1 cfs quota, else the duty cycle
source.py   the rounds at the source: pre-dumps sent while the target runs, then the final dump
server.py   the destination: store each round as an ordinary layer, restore at the end
guard.py    the process that leaves exactly one copy running when ckpt migrate dies (SIGKILL)
guardtcp.py what the guard gives back of --tcp-established connections after such a death
"""
