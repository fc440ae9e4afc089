"""The draft: its model (`model`), which target positions it sees (`modes`), and its
checkpoints (`checkpoint`)."""

from sparrow.draft.checkpoint import check_compatible, init_draft, load_draft, read_draft, save_draft
from sparrow.draft.model import DraftConfig, DraftModel
from sparrow.draft.modes import MODES

__all__ = ["MODES", "DraftConfig", "DraftModel", "check_compatible", "init_draft", "load_draft", "read_draft",
           "save_draft"]
