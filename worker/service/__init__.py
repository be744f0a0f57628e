"""The worker as a service: the run loop (claim, wait out Redis, shut down), signals as events, one entry's
handling (decode, validate, attempts, dead letters), one job's runner, the health key and housekeeping."""
