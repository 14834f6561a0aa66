"""Shared parts of the benchmark scripts (``benchmarks/bench_*.py``).

- ``env``: this checkout on ``sys.path``, optional packages, device, versions, git commit;
- ``scenarios``: the problems (``Scenario``, ``Problem``, ``make_problem``);
- ``naive``: plain torch loops, the maths written out (baseline and float64 reference);
- ``core``, ``contenders``, ``external``: what a contender is, and every contender of a problem
  (ot_losses, the naive loops, SwAV, the official Multi-SK algorithm; POT, GeomLoss, flash-sinkhorn);
- ``agreement``: the float64 reference and the errors of a contender's answer;
- ``timing``: CPU (interleaved repeats) and CUDA (``do_bench``) timers, copy bandwidth;
- ``runner``: one problem, all contenders -> result rows;
- ``report``: metadata, terminal tables, Markdown and plot.
"""
