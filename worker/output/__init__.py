"""Where a job's masks go: the result sink's thread (publish in frame order), the MP4 renderer, a live
job's rolling HLS (hls), and the renderers' share of the machine (render_policy)."""
