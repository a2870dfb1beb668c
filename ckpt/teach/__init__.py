"""Teaching pre-copy migration: measure a process's dirty rate and writable working set (dirtyrate),
model the rounds (simulate), and draw both next to a real `ckpt migrate` (plot, termchart)."""
