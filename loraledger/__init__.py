"""The command line and the end-to-end demo: the top layer, above the pipeline."""
