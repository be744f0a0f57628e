"""Where a job's masks go: the result sink's thread (publish in frame order) and the MP4 renderer."""
