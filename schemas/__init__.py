"""The wire contract shared by producer/ and worker/: messages, codec, names, RLE, prompts, settings.

This package imports nothing from either side.
"""
