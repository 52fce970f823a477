#!/usr/bin/env python
"""Throughput of the training data path: ``python tools/benchmark_data.py --help``, the same program as
``python -m fsaf_d2.benchmark_data`` (:mod:`fsaf_d2.benchmark_data`)."""
import sys

from fsaf_d2.benchmark_data import main

if __name__ == "__main__":
    sys.exit(main())
