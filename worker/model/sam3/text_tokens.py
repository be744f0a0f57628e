"""The CLIP tokenizer SAM 3's text encoder reads, built offline.

SAM 3's text encoder uses CLIP's byte-pair vocabulary (49,408 tokens). Rather than fetch the tokenizer
files from the Hugging Face Hub, the vocabulary is rebuilt from the BPE merges file that open_clip ships
inside its package (`bpe_simple_vocab_16e6.txt.gz`, the file Meta's sam3 and open_clip read): the same
ids as open_clip's `SimpleTokenizer`, so a worker with no network (HF_HUB_OFFLINE=1) tokenizes exactly
as one with it. open_clip is located without being imported (importing it costs seconds).
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
from pathlib import Path
from typing import Any, cast

from transformers import CLIPTokenizer

from schemas.errors import ConfigError

log = logging.getLogger(__name__)

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CONTEXT_LENGTH = 32  # SAM 3 encodes every phrase padded to 32 tokens (Sam3VideoProcessor.add_text_prompt)
_MERGES = 49152 - 256 - 2  # CLIP's merges: vocabulary size less the 256 bytes and the 2 special tokens


def open_clip_bpe_path() -> Path:
    """open_clip's bundled BPE file (located, not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise ConfigError("open_clip is not installed: run `pip install open-clip-torch` (its BPE file is SAM 3's vocabulary)")
    path = Path(spec.origin).parent / BPE_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing: reinstall open-clip-torch (`pip install --force-reinstall open-clip-torch`)")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte -> printable character table (the same as open_clip's and GPT-2's)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def clip_tokenizer(bpe_path: Path | None = None) -> CLIPTokenizer:
    """A CLIPTokenizer with open_clip's ids (start 49406, end 49407), phrases padded to 32 tokens."""
    path = bpe_path or open_clip_bpe_path()
    try:
        lines = gzip.open(path).read().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the BPE file {path}: {e}; reinstall open-clip-torch") from e
    merges = [tuple(line.split()) for line in lines[1:_MERGES + 1]]
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    log.debug("CLIP tokenizer from %s: %d tokens", path, len(vocab))
    # merges as pairs (what the tokenizers library takes; transformers' annotation says strings)
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=cast(Any, merges),
                         model_max_length=CONTEXT_LENGTH)
