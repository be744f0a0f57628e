"""A real RTSP server for the live-source tests: GStreamer's gst-rtsp-server, run by the system Python.

    /usr/bin/python3 tests/rtsp_server_gst.py --port 8554 --path /cam --udp-port 5004

It serves `rtsp://127.0.0.1:PORT/PATH` (RTP over TCP or UDP, as the client asks) from an H.264 RTP
stream that arrives on UDP port `--udp-port` (tests/live_servers.py has ffmpeg send a looped clip there
at its own rate, `-f rtp`): depacketized, parsed (SPS/PPS repeated before each key frame, as cameras
do) and packetized again for the clients. One pipeline is shared by every client. (An MPEG-TS feed
through tsdemux was tried first: it delivered a few frames a second, its timestamps taken from the PCR.)
It prints `ready` once it listens and runs until SIGTERM or SIGINT.

It is a separate script because PyGObject (python3-gi) and the GStreamer typelibs are Debian packages
of the system Python (`apt-get install gir1.2-gst-rtsp-server-1.0`), not of the project's venv.
"""

from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/cam")
    parser.add_argument("--udp-port", type=int, required=True)
    args = parser.parse_args()

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(
        f'( udpsrc port={args.udp_port} caps="application/x-rtp,media=video,clock-rate=90000,encoding-name=H264,'
        f'payload=96" ! rtph264depay ! h264parse config-interval=-1 ! rtph264pay name=pay0 pt=96 )'
    )
    factory.set_shared(True)
    server.get_mount_points().add_factory(args.path, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
        return 1
    loop = GLib.MainLoop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signum, loop.quit)
    print("ready", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
