"""Leaderboards from run.json files only: parquet table, markdown + csv, PNG figures.

    python -m benchmarks.leaderboard results/demo        # one grid
    python -m benchmarks.leaderboard                     # every grid under results/, + index

Reads ``results/<grid>/*/run.json`` (validated with ``validate_run_record``; bad files
are skipped with a warning), never logs.  Writes, atomically and only when the content
changed, into ``results/<grid>/``: ``runs.parquet`` (one row per run),
``leaderboard.md`` / ``leaderboard.csv`` (one row per configuration = method + config
without the seed), ``leaderboard.json`` (summary for the index), ``figures/*.png``; and
regenerates ``results/README.md``.

Statistics (docs/grid.md has the exact rules):

* per task, the primary metric: mean +- std (ddof 1) over seeds and a 95% percentile
  bootstrap CI over seeds (exact enumeration of all n^n resamples for n <= 6 seeds,
  ``benchmarks.stats.bootstrap_ci`` beyond); a single seed carries the run's own CI;
* ``avg`` = mean over tasks of the floor-normalised primary metric
  ``(x - floor) / (1 - floor)`` (higher-is-better metrics in [0, 1] only), per run, then
  mean/std/CI over seeds; the floor of classification accuracy is the majority rate of
  the scored split (``eval_info[task].extra.accuracy.majority_baseline``), elsewhere the
  metric's chance; ``avg (uniform)`` normalises against uniform chance instead;
* delta vs the grid's baseline method: paired by seed (bootstrap of per-seed
  differences) when >= 2 seeds are shared, unpaired bootstrap otherwise;
* rank by ``avg`` (ties share the rank); configurations with a constant-predictor run
  (>= 95% of its predictions on one label) are marked ⚠, not ranked and never named
  best; the best configuration also has to score above the floor and be alone at the top.

Modules: ``statistics`` (pure maths), ``load`` (run.json -> per-run numbers), ``groups``
(configurations, stats, rank, best), ``render`` (markdown, csv, parquet), ``plots``,
``files`` (writes only on change), ``index`` (results/README.md), ``build``, ``cli``.
"""
from benchmarks.leaderboard.build import build_leaderboard, plan_meta, summary, write_figures
from benchmarks.leaderboard.cli import main
from benchmarks.leaderboard.files import write_bytes_if_changed, write_json_if_changed, write_text_if_changed
from benchmarks.leaderboard.groups import (Constant, Group, Stat, choose_best, compute, make_groups, metric_stat,
                                           ordered, pick_baseline, rank_groups)
from benchmarks.leaderboard.index import UNINDEXED, find_grid_dirs, update_index
from benchmarks.leaderboard.load import (LeaderboardWarning, TaskMetric, config_of, flatten, label_share,
                                         load_records, metric_meta, primary_metrics, run_avg, run_constant,
                                         run_floor, secondary_metrics)
from benchmarks.leaderboard.plots import plot_cka, plot_component_deltas, plot_recovery_vs_cka, plot_tasks
from benchmarks.leaderboard.render import constant_note, leaderboard_rows, render_markdown, runs_table
from benchmarks.leaderboard.statistics import (Delta, bootstrap_mean_ci, chance_normalise, delta_vs_baseline,
                                               mean_std, unpaired_delta_ci)

__all__ = [
    "Constant", "Delta", "Group", "LeaderboardWarning", "Stat", "TaskMetric", "UNINDEXED", "bootstrap_mean_ci",
    "build_leaderboard", "chance_normalise", "choose_best", "compute", "config_of", "constant_note",
    "delta_vs_baseline", "find_grid_dirs", "flatten", "label_share", "leaderboard_rows", "load_records", "main",
    "make_groups", "mean_std", "metric_meta", "metric_stat", "ordered", "pick_baseline", "plan_meta",
    "plot_cka", "plot_component_deltas", "plot_recovery_vs_cka", "plot_tasks", "primary_metrics", "rank_groups",
    "render_markdown", "run_avg", "run_constant", "run_floor", "runs_table", "secondary_metrics", "summary",
    "unpaired_delta_ci", "update_index", "write_bytes_if_changed", "write_figures", "write_json_if_changed",
    "write_text_if_changed",
]
