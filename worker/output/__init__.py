"""Where a job's masks go: the result sink's thread (publish in frame order), the MP4 renderer and its
share of the machine (render_policy)."""
