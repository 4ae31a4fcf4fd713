"""mergelab: a model-merging workbench with evolutionary search."""
__version__ = "0.1.0"
