"""The web viewer: cameras and jobs live, a job's video with its masks drawn in the browser from the result
stream, prompts and removals by clicking, zones and lines drawn and saved, the job's alerts and figures.

Served by the fleet daemon (`python -m producer serve --cameras FILE --http-port P`) or alone (`python -m
producer ui [--http-port P] [--host H]`). Modules: `server.py` (start_ui, the `ui` command), `app.py` (the
routes, errors as JSON), `auth.py` (loopback open, a token elsewhere; writes the page's own), `data.py` (jobs
and cameras read from Redis), `entries.py` (stream entries as the page's JSON; the stream cursor), `streams.py`
(the server-sent event streams), `actions.py` (prompt, remove, zones), `media.py` (video, render, frames,
preview files, path-checked). The page itself is in `static/` (plain JavaScript modules, no build step;
hls.js vendored in `static/vendor/`).
"""
