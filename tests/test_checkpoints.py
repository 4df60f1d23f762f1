"""Every shipped checkpoint loads strictly into its registered network and has a card."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from models.checkpoints import CHECKPOINT_DIR, load_model, read_metadata

SHIPPED = sorted(CHECKPOINT_DIR.glob("*.safetensors"))


@pytest.mark.skipif(not SHIPPED, reason="no checkpoint is shipped yet")
@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_checkpoint_loads_and_has_a_card(path) -> None:
    meta = read_metadata(path)
    assert meta["model"] == path.stem and int(meta["steps"]) > 0
    model, used = load_model(path.stem)
    assert used == path
    stored = load_file(str(path))
    assert set(stored) == set(model.state_dict())
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, stored[name].to(value.dtype), msg=name)  # every tensor really loaded
    card = path.with_suffix(".md")
    assert card.is_file() and "vident eval" in card.read_text()
