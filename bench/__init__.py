"""aimesh benchmarks: `python -m bench.run` measures what the datapath costs (see bench/README.md)."""
