"""The GPU worker: `service` (the run loop and one job's runner), `broker` (Redis: claim, lease, fence,
publish, dead letter), `model` (SAM 2 and its sessions), `sources` (where frames come from), `output` (the
result sink and the MP4 renderer)."""
