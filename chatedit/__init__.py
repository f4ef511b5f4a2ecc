"""chatedit: meta-learned model editing for chat checkpoints (MALMEN / MEND)."""

from .api import EditResult, Editor

__all__ = ["Editor", "EditResult"]
