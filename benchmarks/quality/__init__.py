"""Quality benchmark (issues 5 and 13): target-driven ETP against Torque, the paper preset, GReg,
DepGraph group sparsity and magnitude pruning at equal MACs, every method at one default
setting on every task, on tasks that run offline on a CPU.

``python -m benchmarks.quality [--quick] [--out DIR]`` trains, prunes, fine-tunes and evaluates
every (task, method, seed, target speed-up), merges each finished cell into ``DIR/runs.json``
(a rerun resumes from it; processes split by ``--tasks`` may share ``DIR``), then renders plots,
tables, and ``DIR/results.md`` with the computed verdicts (ETP against the best baseline).

Modules: :mod:`.tasks` (data and models), :mod:`.methods` (regularisers and pruning to a MACs
target), :mod:`.runner` (the protocol and the results file), :mod:`.report` (plots, tables).
"""
