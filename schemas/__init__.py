"""The wire contract shared by producer/ and worker/: messages and their codec, stream and key names,
RLE masks, prompts, the storage layout, and the exception tree.

It imports nothing from runtime/, producer/ or worker/.
"""
