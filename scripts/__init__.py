"""Scripts beside the pipeline, run as `python -m scripts.<name>` from the repository root."""
