"""The bundled family of small trained models: a base and skill fine-tunes that merging helps.

`train_family` rebuilds them (`python -m mergelab.demo.train_family`); `FAMILY_DIR` and `DATA_DIR` locate the committed copies.
"""
from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
FAMILY_DIR = DEMO_DIR / "family"
# the same base with fine-tunes that also learned their skill's prompts (for logit fusion)
PROMPT_FAMILY_DIR = DEMO_DIR / "family_prompt"
DATA_DIR = DEMO_DIR / "data"
