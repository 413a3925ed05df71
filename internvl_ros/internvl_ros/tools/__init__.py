"""Command-line tools: offline caption, bag replay, demo."""
