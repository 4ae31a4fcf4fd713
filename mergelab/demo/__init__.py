"""The bundled family of small trained models: a base and skill fine-tunes that merging helps.

`train_family` rebuilds them (`python -m mergelab.demo.train_family`); `FAMILY_DIR` and `DATA_DIR` locate the committed copies.
"""
from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
FAMILY_DIR = DEMO_DIR / "family"
DATA_DIR = DEMO_DIR / "data"
