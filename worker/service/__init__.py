"""The worker as a service: the run loop (claim, retry, shut down, wait out Redis) and one job's runner."""
