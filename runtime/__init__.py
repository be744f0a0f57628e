"""What the producer and the worker both run on, outside the wire contract: the one settings object, logs
and exit codes, Redis connections, fault messages, job limits, frame cleanup, usable CPUs, thread priority."""
