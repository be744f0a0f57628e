"""SAM 3's own part of the model side, the second model family: objects found and tracked by text
phrases ("player", "ball") through Hugging Face transformers' `Sam3VideoModel`, on the CPU or CUDA.

`build.py` loads the model and its processor (the real `facebook/sam3` weights from a local folder or the
Hugging Face cache, never the network; or a tiny random one for tests, `tiny.py`), `text_tokens.py` builds
the CLIP tokenizer offline from open_clip's bundled BPE file, `bounded.py` keeps a session's memory
bounded, and `tracker.py` drives one job frame by frame (`TextTracker`), mask for mask what the library's
own `propagate_in_video_iterator` gives.

Standalone for now: nothing in the worker builds it yet (issue 30 wires it in).
"""
