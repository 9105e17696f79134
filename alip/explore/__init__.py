"""The data explorer: which raw texts does a trained ALIP model distrust, and where does the caption win?

    scoring.py  per-sample s_tc, s_it, s_ic, W_s, W_t, W_c from the training gates (pure math)
    job.py      `alip explore`: the Ray Data job that writes them to one Parquet scores file

The service's /explore page (alip/serving/explore.py) browses such a file.
"""
from alip.explore.scoring import GateSettings, GateSettingsError, gate_scores, score_columns, truth_figure

__all__ = ["GateSettings", "GateSettingsError", "gate_scores", "score_columns", "truth_figure"]
