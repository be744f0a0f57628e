"""The model side: the Segmenter and Session seam, SAM 2 (loaded once, one session per job), its speed-ups
(batched encoder, CUDA graphs, Pillow's resize on the GPU), checkpoints, and the model process."""
