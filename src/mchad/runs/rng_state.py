"""The global random states in every checkpoint, restored on resume."""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)


class RNGState(pl.Callback):
    """Saves the global random states in each checkpoint and restores them on resume.

    Lightning restores weights, optimiser, scheduler and loop counters but not the global RNGs;
    the on-device augmentation and dropout draw from them. Checkpoints are written after an
    epoch's validation, so the saved state is the one the next epoch starts from.
    """

    def state_dict(self) -> dict[str, Any]:
        version, state, gauss = random.getstate()
        np_state = np.random.get_state(legacy=False)
        out = {
            "torch": torch.get_rng_state(),
            # plain tensors and tuples only: loadable with torch.load(weights_only=True)
            "numpy": {
                "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),  # cpu: RNG state for the file
                "pos": int(np_state["state"]["pos"]),
                "has_gauss": int(np_state["has_gauss"]),
                "gauss": float(np_state["gauss"]),
            },
            "python": (version, state, gauss),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda"] = torch.cuda.get_rng_state_all()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        np_state = state_dict["numpy"]
        np.random.set_state(
            {
                "bit_generator": "MT19937",
                "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
                "has_gauss": np_state["has_gauss"],
                "gauss": np_state["gauss"],
            }
        )
        version, state, gauss = state_dict["python"]
        random.setstate((version, tuple(state), gauss))
        cuda = state_dict.get("cuda")
        if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        log.info("Restored the random number generators' states from the checkpoint")
