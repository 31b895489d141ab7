"""Quality benchmark (issue 5): ETP against Torque, GReg, DepGraph group sparsity and magnitude
pruning at equal MACs, on tasks that run offline on a CPU.

``python -m benchmarks.quality [--quick] [--out DIR]`` trains, prunes, fine-tunes and evaluates
every (task, method, seed, target speed-up), appends each finished run to ``DIR/runs.json``
(a rerun resumes from it), then renders plots, tables and ``DIR/results.md``.

Modules: :mod:`.tasks` (data and models), :mod:`.methods` (regularisers and pruning to a MACs
target), :mod:`.runner` (the protocol and the results file), :mod:`.report` (plots, tables).
"""
