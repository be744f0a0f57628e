"""The model side, in two parts.

The host (this folder): the Segmenter and Session seams (`segment.py`, `session.py`), where the model runs
(`host.py`: in this process, a model process shared by the slots, or one per slot; the model process in
`process*.py`), turns on a shared model (`turns.py`), the pool where waiting sessions offer their next step
(`next_steps.py`), the mask-proposer seam and CLIP labels (`proposals.py`, `labels.py`), and which model is
built (`build.py`).

A model family in a folder of its own: `sam2` (SAM 2's segmenter and session, batched steps, CUDA graphs,
checkpoints, its automatic mask generator), and `sam3` (SAM 3: instances found and tracked by text phrases,
through transformers; standalone for now, not yet built from `build.py`).
"""
