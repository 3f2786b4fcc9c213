"""Experiments: runs that produce measured records (the balancing stream, FP8 vs BF16 training), one module each;
report sections and performance suites call them and render or store their records."""
