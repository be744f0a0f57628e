"""SAM 2's own part of the model side, the first model family: its segmenter and session
(`segmenter.py`, `session.py`), tracking steps and image encoding batched across objects and jobs
(`step_batch.py`, `encoder_batch.py`), CUDA graphs, checkpoints and presets, its frame loader and Pillow's
resize on the GPU (`lazy_frames.py`, `pil_resize.py`), and its automatic mask generator (`proposer.py`).

What it builds on is the host, one level up in worker/model/: the Segmenter and Session protocols, turns on a
shared model, the pool of next steps, the model process. A second model family is a sibling folder.
"""
