"""Which model a worker serves (`python -m worker --model NAME`, VSEG_MODEL), and so which jobs it takes.

    sam2.1-tiny | sam2.1-small | sam2.1-base-plus | sam2.1-large   SAM 2.1 (configs/models.yaml): points and boxes
    sam3                                                            SAM 3 (worker/model/sam3): text phrases

The presets' short names (tiny, small, base_plus, large) are accepted as before. A worker serves one model and reads
the jobs stream of what that model can do (schemas/names.py LANES): a SAM 2 worker `vseg:jobs`, a SAM 3 worker
`vseg:jobs:text`. It says so in its health key (`model`, `capabilities`), which `submit` reads to refuse a job that
no live worker could take (producer/capabilities.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.errors import ConfigError
from schemas.names import LANES, POINTS, TEXT

SAM3 = "sam3"
SAM2_PRESETS = {"sam2.1-tiny": "tiny", "sam2.1-small": "small", "sam2.1-base-plus": "base_plus",
                "sam2.1-large": "large"}
NAMES = (*SAM2_PRESETS, SAM3)


@dataclass(frozen=True)
class ModelChoice:
    """A worker's model: its name (as in results and logs), family, SAM 2 preset and what it can do."""

    name: str  # "sam2.1-tiny", ..., "sam3"
    family: str  # "sam2" or "sam3"
    preset: str  # the SAM 2 preset (configs/models.yaml), "" for SAM 3
    capability: str  # schemas.names.POINTS or TEXT

    @property
    def lane(self) -> str:
        """The jobs stream's lane this worker reads."""
        return LANES[self.capability]


def choose_model(name: str) -> ModelChoice:
    """The model called `name` (a name of NAMES, or a SAM 2 preset's short name); ConfigError otherwise."""
    key = name.strip().lower()
    if key == SAM3:
        return ModelChoice(SAM3, "sam3", "", TEXT)
    short = {v: k for k, v in SAM2_PRESETS.items()}
    full = key if key in SAM2_PRESETS else short.get(key.replace("-", "_"))
    if full is None:
        raise ConfigError(f"unknown model {name!r}: give --model (VSEG_MODEL) one of {', '.join(NAMES)}")
    return ModelChoice(full, "sam2", SAM2_PRESETS[full], POINTS)
