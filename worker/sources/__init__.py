"""Where a job's frames come from: a finished frame directory or frames streamed by the producer."""
